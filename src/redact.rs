//! Keeping secrets out of logs, `Debug` output and error text.

/// `url` with its password replaced by `***` (`postgres://user:***@host/db`). A string
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
    if let Ok(decoded) = percent_decode(secret)
        && decoded != secret
        && !decoded.is_empty()
    {
        out = out.replace(&decoded, "***");
    }
    out
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
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
        let pw = password("postgres://app:s3cr%40t@db/x");
        assert_eq!(
            scrub("failed for s3cr@t and s3cr%40t", pw.as_deref()),
            "failed for *** and ***"
        );
    }
}
