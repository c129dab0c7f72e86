//! Secrets out of every message: URLs lose their `user:password@` and the
//! values of query parameters that carry credentials (presigned S3 URLs'
//! `X-Amz-Signature` and `X-Amz-Credential`, `token`, `sig`, `key`, …)
//! wherever a URL is printed — errors, item errors in status, events, dead
//! letters and logs.

/// Query parameters (case-insensitive, by name or prefix) whose values are
/// secrets.
const SECRET_PARAMS: &[&str] = &[
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "signature",
    "sig",
    "token",
    "access_token",
    "id_token",
    "refresh_token",
    "api_key",
    "apikey",
    "api-key",
    "key",
    "secret",
    "password",
    "passwd",
    "auth",
    "authorization",
    "credential",
    "credentials",
    "client_secret",
    "code",
];

const HIDDEN: &str = "REDACTED";

fn is_secret_param(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_PARAMS.contains(&name.as_str())
        || name.ends_with("token")
        || name.ends_with("secret")
        || name.ends_with("signature")
        || name.ends_with("password")
}

/// `url` with its userinfo and secret query values replaced; text that is
/// not a URL is returned as it is.
pub fn url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_string();
    };
    if !parsed.has_host() {
        return url.to_string();
    }
    let mut changed = false;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username(HIDDEN);
        let _ = parsed.set_password(None);
        changed = true;
    }
    if parsed.query().is_some() {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                if is_secret_param(&k) {
                    changed = true;
                    (k.into_owned(), HIDDEN.to_string())
                } else {
                    (k.into_owned(), v.into_owned())
                }
            })
            .collect();
        if changed {
            parsed.query_pairs_mut().clear().extend_pairs(pairs);
        }
    }
    if changed {
        parsed.to_string()
    } else {
        url.to_string()
    }
}

/// Every URL inside `text` (an error message, say) redacted as [`url`] does.
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = find_scheme(rest) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | ')' | '`'))
            .unwrap_or(tail.len());
        out.push_str(&url(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Where the next `scheme://` starts (a run of letters, digits, `+-.`).
fn find_scheme(s: &str) -> Option<usize> {
    let at = s.find("://")?;
    let start = s[..at]
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |i| i + 1);
    if start == at {
        // `://` without a scheme: skip past it.
        let next = find_scheme(&s[at + 3..])?;
        return Some(at + 3 + next);
    }
    Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_urls_and_userinfo_lose_their_secrets() {
        let u = "https://bucket.s3.amazonaws.com/a.pdf?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261201&X-Amz-Signature=deadbeefcafe&X-Amz-Expires=60";
        let r = url(u);
        assert!(
            !r.contains("deadbeefcafe") && !r.contains("AKIDEXAMPLE"),
            "{r}"
        );
        assert!(r.contains("X-Amz-Algorithm=AWS4-HMAC-SHA256") && r.contains("X-Amz-Expires=60"));
        let r = url("https://alice:s3cr3t@example.com/x?token=abc&page=2");
        assert!(
            !r.contains("s3cr3t") && !r.contains("abc") && !r.contains("alice"),
            "{r}"
        );
        assert!(r.contains("page=2"), "{r}");
        assert_eq!(
            url("https://example.com/a.txt"),
            "https://example.com/a.txt"
        );
        assert_eq!(url("nats://u:p@nats:4222"), "nats://REDACTED@nats:4222");
        assert_eq!(url("not a url"), "not a url");
    }

    #[test]
    fn urls_inside_text_are_redacted() {
        let t = "error sending request for url (https://u:pw@h.example/f?sig=SECRET&x=1): connection closed";
        let r = text(t);
        assert_eq!(
            r,
            "error sending request for url (https://REDACTED@h.example/f?sig=REDACTED&x=1): connection closed"
        );
        assert_eq!(text("no urls here"), "no urls here");
        assert_eq!(
            text("odd ://x and http://a/?token=t"),
            "odd ://x and http://a/?token=REDACTED"
        );
    }
}
