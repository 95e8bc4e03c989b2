//! Unit tests of the module beside this file.

use super::*;

const SECRET: &str = "s3cr3t-Pa55";

#[test]
fn no_form_of_a_password_is_ever_shown() -> Result<()> {
    for text in [
        format!("postgres://app:{SECRET}@db.example.com/app"),
        format!("postgresql://app@db.example.com:6543/app?password={SECRET}&sslmode=require"),
        format!("host=/tmp port=5432 password={SECRET} user=x"),
        format!("host=/tmp password = {SECRET} user=x"),
        format!("host=/tmp password= '{SECRET}' user=x"),
        format!("host = /tmp password ='{SECRET} with spaces' user=x"),
        format!("host=/tmp password='it\\'s {SECRET}' user=x"),
        format!("host=/tmp password={SECRET}\\ escaped user=x"),
        format!("host=/tmp\tpassword={SECRET}\nuser=x"),
        format!(
            "postgres://app:{}@db.example.com/app",
            SECRET.replace('5', "%35")
        ),
    ] {
        let target = PostgresTarget::parse(&text)?;
        let builder = format!("{:?}", crate::PostgresStore::builder(&text));
        assert!(builder.contains("host="), "{builder}");
        for shown in [target.to_string(), format!("{target:?}"), builder] {
            assert!(
                !shown.contains(SECRET) && !shown.contains("s3cr3t"),
                "{text:?} shown as {shown}"
            );
            assert!(!shown.contains("password"), "{shown}");
        }
    }
    // Unreadable strings and unknown keys: the error holds no secret.
    for text in [
        format!("host=/tmp password='{SECRET}"),
        format!("host=/tmp pasword={SECRET}"),
        format!("host=/tmp {SECRET}"),
        format!("postgres://app:{SECRET}@db/%zz"),
        format!("host=/tmp sslmode={SECRET}"),
    ] {
        let Err(err) = PostgresTarget::parse(&text) else {
            panic!("accepted: {text}");
        };
        assert!(!err.to_string().contains(SECRET), "{text}: {err}");
    }
    Ok(())
}

/// `text` percent-encoded for a URL's user info or query.
fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

proptest::proptest! {
    /// Any password, in every place and spelling libpq takes one,
    /// reads back as itself and never shows.
    #[test]
    fn any_password_in_any_form_reads_back_and_never_shows(
        tail in "[ -~]{0,24}",
        spaces in 0usize..3,
    ) {
        // A marker no other field holds, then anything printable.
        let password = format!("Pw9{tail}");
        let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
        let bare: String = password
            .chars()
            .flat_map(|c| {
                let escape = c.is_whitespace() || c == '\\' || c == '\'';
                escape.then_some('\\').into_iter().chain(std::iter::once(c))
            })
            .collect();
        let pad = " ".repeat(spaces);
        let forms = [
            format!("postgres://app:{}@db.example.com:5433/app", url_encoded(&password)),
            format!("postgresql://app@db.example.com/app?password={}&sslmode=require", url_encoded(&password)),
            format!("host=db.example.com user=app password{pad}={pad}'{quoted}' dbname=app"),
            format!("host=db.example.com password{pad}={pad}{bare} user=app"),
            format!("password='{quoted}'{pad} host=db.example.com"),
        ];
        for text in &forms {
            let target = PostgresTarget::parse(text)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{text}: {e}")))?;
            proptest::prop_assert_eq!(target.config().get_password(), Some(password.as_bytes()), "{}", text);
            for shown in [target.to_string(), format!("{target:?}")] {
                proptest::prop_assert!(!shown.contains("Pw9"), "{} shown as {}", text, shown);
            }
        }
    }
}

#[test]
fn both_forms_read_the_same() -> Result<()> {
    let url = PostgresTarget::parse(
        "postgres://ada%40x:pw@db.example.com:6543/my%20db?application_name=relay-1",
    )?;
    assert_eq!(
        url.to_string(),
        "host=db.example.com port=6543 user=ada@x dbname='my db' application_name=relay-1 \
         sslmode=verify-full"
    );
    assert_eq!(url.config().get_user(), Some("ada@x"));
    assert_eq!(url.config().get_password(), Some(&b"pw"[..]));
    assert_eq!(url.config().get_application_name(), Some("relay-1"));
    let kv = PostgresTarget::parse(
        "host = db.example.com port=6543 user='ada@x' password='pw' dbname='my db' \
         application_name=relay-1",
    )?;
    assert_eq!(kv.to_string(), url.to_string());
    let v6 = PostgresTarget::parse("postgres://u@[::1]:5433,[::2]/d")?;
    assert_eq!(
        v6.to_string(),
        "host=::1,::2 port=5433, user=u dbname=d sslmode=verify-full"
    );
    let socket = PostgresTarget::parse("postgres://u@%2Ftmp%2Fpg/d")?;
    assert_eq!(socket.ssl_mode(), SslMode::Prefer);
    assert!(matches!(socket.config().get_hosts(), [Host::Unix(p)] if p.as_os_str() == "/tmp/pg"));
    Ok(())
}

#[test]
fn tls_is_required_off_this_machine_and_modes_mean_what_libpq_says() -> Result<()> {
    let mode = |s: &str| PostgresTarget::parse(s).map(|t| t.ssl_mode());
    assert_eq!(mode("host=/tmp dbname=x")?, SslMode::Prefer);
    assert_eq!(mode("host=localhost dbname=x")?, SslMode::Prefer);
    assert_eq!(mode("host=127.0.0.1 dbname=x")?, SslMode::Prefer);
    assert_eq!(mode("host=db.example.com dbname=x")?, SslMode::VerifyFull);
    assert_eq!(
        mode("host=localhost,db.example.com dbname=x")?,
        SslMode::VerifyFull
    );
    assert_eq!(
        mode("host=db.example.com sslmode=require")?,
        SslMode::Require
    );
    assert_eq!(
        mode("postgres://db.example.com/x?sslmode=disable")?,
        SslMode::Disable
    );
    assert!(mode("host=x sslmode=bogus").is_err());
    let err = |s: &str| {
        PostgresTarget::parse(s)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(err("host=x sslcert=/c.pem").contains("not supported"));
    assert!(err("host=x pasword=y").contains("not a connection setting this build knows"));
    assert!(mode("host=x sslmode=verify-full sslrootcert=/no/such/file").is_err());
    // A socket never speaks TLS, whatever the mode.
    let socket = PostgresTarget::parse("host=/tmp sslmode=verify-full")?;
    assert!(socket.tls.is_none());
    assert_eq!(socket.config().get_ssl_mode(), PgSslMode::Disable);
    Ok(())
}

#[test]
fn an_unknown_key_is_named_but_never_in_full() {
    assert_eq!(shown_value("colour"), "colour");
    assert_eq!(shown_value("a\u{1b}b"), "ab");
    assert_eq!(shown_value(&"k".repeat(24)), "k".repeat(24));
    assert_eq!(shown_value(&"k".repeat(25)), format!("{}…", "k".repeat(24)));
    let err = PostgresTarget::parse("host=db colour=blue")
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("\"colour\"") && !err.contains("blue"), "{err}");
}

#[test]
fn what_looks_like_a_server() {
    assert!(PostgresTarget::looks_like("postgres://x/y"));
    assert!(PostgresTarget::looks_like("host=/tmp dbname=app"));
    assert!(PostgresTarget::looks_like("host = /tmp"));
    assert!(PostgresTarget::looks_like("dbname=app user=x"));
    assert!(PostgresTarget::looks_like(
        "host=db sslmode=verify-full sslrootcert=/ca.pem"
    ));
    assert!(!PostgresTarget::looks_like("host=db colour=blue"));
    assert!(!PostgresTarget::looks_like("app.db"));
    assert!(!PostgresTarget::looks_like("./host=1.db"));
    assert!(!PostgresTarget::looks_like("data/x=1.db"));
    assert!(!PostgresTarget::looks_like(""));
}

#[test]
fn settings_the_user_gives_are_kept() -> Result<()> {
    let t = PostgresTarget::parse("host=/tmp application_name=billing-relay keepalives_idle=5")?;
    assert_eq!(t.config().get_application_name(), Some("billing-relay"));
    assert_eq!(t.config().get_keepalives_idle(), Duration::from_secs(5));
    let t = PostgresTarget::parse(
        "host=/tmp keepalives_interval=3 keepalives_retries=7 tcp_user_timeout=9",
    )?;
    assert_eq!(
        t.config().get_keepalives_interval(),
        Some(Duration::from_secs(3))
    );
    assert_eq!(t.config().get_keepalives_retries(), Some(7));
    assert_eq!(
        t.config().get_tcp_user_timeout(),
        Some(&Duration::from_secs(9))
    );
    let t = PostgresTarget::parse("host=/tmp")?;
    assert_eq!(t.config().get_application_name(), Some("sqlite-outbox"));
    assert_eq!(t.config().get_keepalives_idle(), Duration::from_secs(30));
    assert_eq!(
        t.config().get_keepalives_interval(),
        Some(Duration::from_secs(10))
    );
    assert_eq!(t.config().get_keepalives_retries(), Some(3));
    assert_eq!(
        t.config().get_tcp_user_timeout(),
        Some(&Duration::from_secs(60))
    );
    Ok(())
}
