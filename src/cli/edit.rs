//! `steadfast dlq edit`: one dead letter corrected (body from a file, headers from flags,
//! or both in `$EDITOR`) and sent again with a new id and `steadfast-replay-of` = the
//! original id, so an inbox that saw the original does not drop the copy as a duplicate.
//! The copy goes through the same replay path as `dlq replay`: the original is removed
//! only after the broker confirmed the copy.

use super::{
    CliError, Common, audit,
    dlq::{EditArgs, select},
    print,
};
use crate::{
    Envelope, MessageId,
    envelope::header,
    transport::{DeadLetter, DeadLetterFilter, Transport},
};
use bytes::Bytes;
use std::process::ExitCode;

/// The value shown for a secret header in the editor; left as is, the original stays.
const HIDDEN: &str = "***";

pub(super) async fn run(
    t: &dyn Transport,
    common: &Common,
    e: EditArgs,
) -> Result<ExitCode, CliError> {
    let f = DeadLetterFilter::default().id(e.id).limit(1);
    let mut found = None;
    select(t, &e.group, &f, |d| found = Some(d)).await?;
    let Some(dl) = found else {
        return Err(CliError(format!(
            "no dead letter of `{}` has id {}",
            e.group, e.id
        )));
    };
    let mut env = dl.replay_envelope();
    if e.body.is_none() && e.headers.is_empty() && e.remove_headers.is_empty() {
        edit_in_editor(&mut env).await?;
    } else {
        if let Some(path) = &e.body {
            env.payload = Bytes::from(read_body(path)?);
        }
        for (k, v) in &e.headers {
            env.headers.insert(k.as_str(), v.as_str());
        }
        for k in &e.remove_headers {
            env.headers.remove(k);
        }
    }
    if env.payload == dl.envelope.payload
        && env
            .headers
            .iter()
            .filter(|(k, _)| !is_replay_header(k))
            .eq(dl
                .envelope
                .headers
                .iter()
                .filter(|(k, _)| !is_replay_header(k)))
    {
        return Err(CliError::new(
            "nothing was changed: the dead letter stays as it is",
        ));
    }
    env.id = MessageId::new();
    env.headers
        .insert(header::REPLAY_OF, dl.id().to_string().as_str());
    if e.dry_run {
        if common.json {
            println!(
                "{}",
                serde_json::json!({ "dry_run": true, "action": "edit", "ids": [dl.id().to_string()], "new_id": env.id.to_string(), "message": print::show_json(&DeadLetter::from_envelope(env.clone())) })
            );
        } else {
            println!(
                "dry run: would send this in place of {}; nothing changed",
                dl.id()
            );
            println!("{}", print::show_text(&DeadLetter::from_envelope(env)));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let selection = serde_json::json!({
        "id": dl.id().to_string(),
        "new_id": env.id.to_string(),
        "body_changed": env.payload != dl.envelope.payload,
    });
    let audit = audit::begin(
        &common.db,
        "edit",
        &format!("{}:{}", t.system(), e.group),
        selection,
    )
    .await?;
    env.headers.insert(header::REPLAYED_BY, audit.actor());
    env.headers
        .insert(header::AUDIT_ID, audit.id().to_string().as_str());
    let original = dl.id();
    let rewrite = |d: &DeadLetter| {
        if d.id() == original {
            env.clone()
        } else {
            d.replay_envelope()
        }
    };
    let report = t
        .replay_dead_letters_as(&e.group, &f, &rewrite, &|_| {})
        .await;
    let mut outcome = match &report {
        Ok(r) => {
            serde_json::json!({ "done": r.done, "failed": r.failed, "first_error": r.first_error })
        }
        Err(err) => serde_json::json!({ "error": err.to_string() }),
    };
    outcome["new_id"] = env.id.to_string().into();
    let ok = matches!(&report, Ok(r) if r.done == 1);
    let done_ids = if ok { vec![original] } else { Vec::new() };
    audit.finish(&done_ids, outcome).await?;
    let r = report.map_err(|err| CliError(format!("sending the corrected message: {err}")))?;
    if common.json {
        println!(
            "{}",
            serde_json::json!({
                "action": "edit",
                "group": e.group,
                "id": original.to_string(),
                "new_id": env.id.to_string(),
                "done": r.done,
                "failed": r.failed,
                "first_error": r.first_error,
            })
        );
    } else if ok {
        println!(
            "sent the corrected message as {} (replay of {original}); the dead letter is removed",
            env.id
        );
    } else {
        println!(
            "the corrected message was not confirmed; dead letter {original} stays: {}",
            r.first_error.as_deref().unwrap_or("it was not found again")
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn is_replay_header(k: &str) -> bool {
    [header::REPLAYED_AT, header::REPLAY_COUNT]
        .iter()
        .any(|h| k.eq_ignore_ascii_case(h))
}

fn read_body(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| CliError(format!("reading the body from standard input: {e}")))?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| CliError(format!("reading `{}`: {e}", path.display())))
}

/// Opens `$VISUAL` or `$EDITOR` on a JSON document of the headers and body; secret
/// headers are shown as `***` and keep their value unless changed.
async fn edit_in_editor(env: &mut Envelope) -> Result<(), CliError> {
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .map_err(|_| {
            CliError::new(
                "nothing to change: pass --body FILE or --header name=value, or set $EDITOR",
            )
        })?;
    let headers: serde_json::Map<String, serde_json::Value> = env
        .headers
        .iter()
        .filter(|(k, _)| !is_replay_header(k))
        .map(|(k, v)| {
            let v = if print::is_secret_header(k) {
                HIDDEN
            } else {
                v
            };
            (k.to_owned(), v.into())
        })
        .collect();
    let body = match serde_json::from_slice::<serde_json::Value>(&env.payload) {
        Ok(v) => serde_json::json!({ "json": v }),
        Err(_) => serde_json::json!({ "text": String::from_utf8_lossy(&env.payload) }),
    };
    let doc = serde_json::json!({ "headers": headers, "body": body });
    let path = std::env::temp_dir().join(format!("steadfast-edit-{}.json", MessageId::new()));
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    std::fs::write(&path, text).map_err(|e| CliError(format!("writing a temporary file: {e}")))?;
    let (cmd, file) = (format!("{editor} \"$1\""), path.clone());
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .arg("sh")
            .arg(file)
            .status()
    })
    .await
    .map_err(|e| CliError(format!("running the editor: {e}")))?;
    let edited = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            return Err(CliError(format!(
                "the editor exited with {s}; nothing sent"
            )));
        }
        Err(e) => return Err(CliError(format!("cannot run the editor `{editor}`: {e}"))),
    }
    let edited = edited.map_err(|e| CliError(format!("reading the edited file: {e}")))?;
    let doc: serde_json::Value = serde_json::from_slice(&edited)
        .map_err(|e| CliError(format!("the edited file is not JSON: {e}; nothing sent")))?;
    let bad = || {
        CliError::new(
            "the edited file must be {\"headers\": {name: text}, \"body\": {\"json\": ...} or {\"text\": ...}}; nothing sent",
        )
    };
    let new_headers = doc["headers"].as_object().ok_or_else(bad)?;
    let mut headers = crate::envelope::Headers::new();
    for (k, v) in new_headers {
        let v = v.as_str().ok_or_else(bad)?;
        let v = match env.headers.get(k) {
            Some(old) if v == HIDDEN && print::is_secret_header(k) => old.to_owned(),
            _ => v.to_owned(),
        };
        headers.insert(k.as_str(), v);
    }
    for (k, v) in env.headers.iter() {
        if is_replay_header(k) {
            headers.insert(k, v);
        }
    }
    env.headers = headers;
    env.payload = match (&doc["body"]["json"], &doc["body"]["text"]) {
        (serde_json::Value::Null, serde_json::Value::String(s)) => {
            Bytes::from(s.clone().into_bytes())
        }
        (v, serde_json::Value::Null) if !v.is_null() => {
            Bytes::from(serde_json::to_vec(v).map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    };
    Ok(())
}
