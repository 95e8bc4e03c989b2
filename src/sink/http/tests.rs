//! Unit tests of the module beside this file.

use super::*;
use crate::Error;

#[test]
fn endpoints_are_checked_before_delivery() {
    for bad in [
        "",
        "not a url",
        "ftp://example.com/x",
        "http://",
        "/relative",
        "mailto:a@b",
    ] {
        assert!(HttpSink::builder(bad).is_err(), "{bad:?}");
    }
    assert!(HttpSink::builder("https://api.example.com/events").is_ok());
}

fn sink(url: &str, header: bool) -> Result<HttpSink> {
    let mut b = HttpSink::builder(url)?;
    if header {
        b = b.header("Authorization", "Bearer x")?;
    }
    b.build()
}

#[test]
fn plain_http_with_credentials_is_noticed() -> Result<()> {
    let remote = "http://api.example.com/x";
    assert!(sink(remote, true)?.sends_credentials_in_the_clear());
    assert!(!sink(remote, false)?.sends_credentials_in_the_clear());
    assert!(sink("http://u:p@api.example.com/", false)?.sends_credentials_in_the_clear());
    assert!(sink("http://api.example.com/?k=v", false)?.sends_credentials_in_the_clear());
    assert!(!sink("https://api.example.com/", true)?.sends_credentials_in_the_clear());
    assert!(!sink("http://127.0.0.1:8080/", true)?.sends_credentials_in_the_clear());
    assert!(!sink("http://localhost/", true)?.sends_credentials_in_the_clear());
    assert!(!sink("http://[::1]/", true)?.sends_credentials_in_the_clear());
    Ok(())
}

#[test]
fn headers_are_checked_and_their_values_never_shown() -> Result<()> {
    let b = HttpSink::builder("https://api.example.com/")?;
    let refused = b
        .header("Bad Name", "s3cret-value")
        .err()
        .ok_or_else(|| Error::invalid("taken"))?;
    assert!(!refused.to_string().contains("s3cret"), "{refused}");
    let b = HttpSink::builder("https://api.example.com/")?;
    assert!(b.header("X-Key", "a\r\nInjected: 1").is_err());
    let s = HttpSink::builder("https://u:pw@api.example.com/?token=t0k")?
        .header("X-Key", "s3cret-value")?
        .build()?;
    let shown = format!("{s:?}");
    for secret in ["s3cret", "pw", "t0k"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    assert!(shown.contains("X-Key"), "{shown}");
    Ok(())
}

#[test]
fn binary_cloudevents_have_no_batches() -> Result<()> {
    let b = HttpSink::builder("https://api.example.com/")?
        .format(super::super::Format::CloudEventsBinary {
            source: "/x".into(),
        })
        .batch(10);
    assert!(b.build().is_err());
    Ok(())
}

#[test]
fn retry_after_takes_seconds_and_dates_and_never_panics() {
    assert_eq!(retry_after(Some("120")), Some(Duration::from_secs(120)));
    assert_eq!(
        retry_after(Some("18446744073709551615")),
        Some(Duration::from_secs(u64::MAX))
    );
    assert_eq!(retry_after(Some("soon")), None);
    assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
    assert_eq!(retry_after(None), None);
}

#[test]
fn credentials_in_urls_and_headers_are_hidden() -> std::result::Result<(), url::ParseError> {
    let url = Url::parse("https://ada:s3cret@api.example.com/hook?token=abc123#x")?;
    assert_eq!(redact_url(&url), "https://***@api.example.com/hook?***");
    let user_only = Url::parse("https://tok3n@api.example.com/hook")?;
    assert_eq!(redact_url(&user_only), "https://***@api.example.com/hook");
    let message = format!("connection refused: {url} (token=abc123, pw s3cret)");
    let shown = redact(&message, &url, &[]);
    for secret in ["s3cret", "abc123", "ada"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    let headers = [
        (
            "Authorization".to_owned(),
            "Bearer tok-0123456789".to_owned(),
        ),
        ("X-Api-Key".to_owned(), "k3y-value".to_owned()),
    ];
    let echoed =
        "HTTP 401: got authorization=Bearer tok-0123456789, token tok-0123456789, key k3y-value";
    let shown = redact(echoed, &url, &headers);
    for secret in ["tok-0123456789", "k3y-value"] {
        assert!(!shown.contains(secret), "{shown}");
    }
    Ok(())
}
