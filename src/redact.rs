//! Keeping secrets out of logs, `Debug` output and error text.
#![cfg_attr(
    not(any(feature = "amqp", feature = "postgres", feature = "sqlite")),
    allow(dead_code)
)]

/// `url` with its password replaced by `***` (`postgres://user:***@host/db`); used for
/// the AMQP and database URLs (NATS has its own for server lists and token users). A string
/// that is not a URL is replaced entirely, since it may hold a secret in an unknown place.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() && u.set_password(Some("***")).is_err() {
                return "(unparseable url)".to_owned();
            }
            u.to_string()
        }
        Err(_) => "(unparseable url)".to_owned(),
    }
}

/// `url` with its user information hidden: the password replaced by `***`, and a user
/// name without a password (a token, as in `nats://TOKEN@host`) replaced by `***` too.
/// A string that is not a URL is replaced entirely.
pub(crate) fn redact_userinfo(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let ok = if u.password().is_some() {
                u.set_password(Some("***")).is_ok()
            } else if !u.username().is_empty() {
                u.set_username("***").is_ok()
            } else {
                true
            };
            if ok {
                u.to_string()
            } else {
                "(unparseable url)".to_owned()
            }
        }
        Err(_) => "(unparseable url)".to_owned(),
    }
}

/// A comma-separated list of URLs (or one URL), each with its user information hidden
/// as by [`redact_userinfo`].
pub(crate) fn redact_list(urls: &str) -> String {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(redact_userinfo)
        .collect::<Vec<_>>()
        .join(",")
}

/// The password of `url`, if it has one (to scrub it from third-party error text).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn password(url: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
        .filter(|p| !p.is_empty())
}

/// `text` with every occurrence of `secret` (raw or percent-decoded) replaced by `***`.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn scrub(text: &str, secret: Option<&str>) -> String {
    let Some(secret) = secret else {
        return text.to_owned();
    };
    let mut out = text.replace(secret, "***");
    if let Ok(decoded) = percent_encoding::percent_decode_str(secret).decode_utf8()
        && decoded != secret
        && !decoded.is_empty()
    {
        out = out.replace(&*decoded, "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/test"),
            "postgres://postgres@127.0.0.1:5432/test"
        );
        assert_eq!(redact_url("not a url s3cr3t"), "(unparseable url)");
        assert_eq!(
            redact_userinfo("nats://t0ken@nats:4222"),
            "nats://***@nats:4222"
        );
        assert_eq!(
            redact_userinfo("amqp://u:p4ss@rabbit/%2f"),
            "amqp://u:***@rabbit/%2f"
        );
        let pw = password("postgres://app:s3cr%40t@db/x");
        assert_eq!(
            scrub("failed for s3cr@t and s3cr%40t", pw.as_deref()),
            "failed for *** and ***"
        );
    }
}
