# Usage: sh docker/stub-targets.sh DIR...
# For each workspace member DIR, creates an empty source for its library and for every
# target its Cargo.toml declares ([[bin]], [[example]], [[test]], [[bench]]), so cargo
# loads the workspace before the sources are copied (the Dockerfile's dependency layer).
set -eu
for dir in "$@"; do
  mkdir -p "$dir/src"
  [ -e "$dir/src/lib.rs" ] || : > "$dir/src/lib.rs"
  awk '
    function emit() {
      if (kind == "") return
      if (path == "") path = kind "/" name ".rs"
      print path
      kind = ""; name = ""; path = ""
    }
    /^\[\[bin\]\]/     { emit(); kind = "src/bin"; next }
    /^\[\[example\]\]/ { emit(); kind = "examples"; next }
    /^\[\[bench\]\]/   { emit(); kind = "benches"; next }
    /^\[\[test\]\]/    { emit(); kind = "tests"; next }
    /^\[/              { emit(); next }
    kind != "" && /^name *=/ { gsub(/"/, "", $3); name = $3 }
    kind != "" && /^path *=/ { gsub(/"/, "", $3); path = $3 }
    END { emit() }
  ' "$dir/Cargo.toml" | while read -r f; do
    mkdir -p "$dir/$(dirname "$f")"
    [ -e "$dir/$f" ] || echo 'fn main() {}' > "$dir/$f"
  done
done
