//! Compile-time behaviour of `#[derive(Message)]`: what compiles, and the errors misuse gets.

#[test]
fn derive_message() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
