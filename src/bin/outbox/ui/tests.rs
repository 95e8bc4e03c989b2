//! Unit tests of the module beside this file.

use super::host::split_host;
use super::*;

fn loopback(port: u16, default_port: u16, public: Option<&str>) -> HostRule {
    HostRule::Loopback {
        port,
        default_port,
        public: public.map(str::to_owned),
    }
}

#[test]
fn on_loopback_any_loopback_name_with_the_port_is_this_dashboard() {
    let rule = loopback(8025, 80, None);
    for host in [
        "127.0.0.1:8025",
        "127.0.0.2:8025",
        "127.255.0.9:8025",
        "localhost:8025",
        "LOCALHOST:8025",
        "[::1]:8025",
    ] {
        assert!(rule.allows(host), "{host}");
    }
    for host in [
        "127.0.0.1",
        "127.0.0.1:80",
        "127.0.0.1:8026",
        "128.0.0.1:8025",
        "evil.example:8025",
        "localhost.evil.example:8025",
        "[::2]:8025",
        "[::1]",
        "",
        "127.0.0.1:notaport",
    ] {
        assert!(!rule.allows(host), "{host}");
    }
    // On the scheme's default port, browsers leave the port out.
    let rule = loopback(80, 80, None);
    assert!(rule.allows("localhost") && rule.allows("127.0.0.1") && rule.allows("[::1]"));
    assert!(rule.allows("127.0.0.1:80"));
    let rule = loopback(443, 443, Some("outbox.example.com"));
    assert!(rule.allows("127.0.0.1") && rule.allows("outbox.example.com"));
    assert!(!rule.allows("other.example.com"));
    assert!(HostRule::Any.allows("anything"));
}

#[test]
fn a_public_origin_is_a_bare_origin() {
    assert_eq!(
        public_origin("https://Outbox.Example.com").ok(),
        Some("https://outbox.example.com".to_owned())
    );
    assert_eq!(
        public_origin("https://outbox.example.com:8443/").ok(),
        Some("https://outbox.example.com:8443".to_owned())
    );
    for bad in [
        "outbox.example.com",
        "ftp://outbox.example.com",
        "https://outbox.example.com/ui",
        "https://u:p@outbox.example.com",
        "https://u@outbox.example.com",
        "https://:p@outbox.example.com",
        "https://outbox.example.com/#x",
        "https://outbox.example.com/?x=1",
    ] {
        assert!(public_origin(bad).is_err(), "{bad}");
    }
}

#[test]
fn split_host_takes_ports_off_names_and_v6_addresses() {
    assert_eq!(split_host("a:1"), ("a", Some("1")));
    assert_eq!(split_host("a"), ("a", None));
    assert_eq!(split_host("[::1]:2"), ("[::1]", Some("2")));
    assert_eq!(split_host("[::1]"), ("[::1]", None));
    assert_eq!(split_host("[::1]:"), ("[::1]", None));
}

#[test]
fn a_change_must_name_this_dashboard_as_its_origin() -> Result<(), String> {
    let ui = Ui {
        store: Arc::new(sqlite_outbox::MemoryStore::new()),
        db: String::new(),
        read_only: false,
        refresh: 0,
        token: None,
        sessions: Sessions::new()?,
        hosts: HostRule::Any,
        public_origin: Some("https://outbox.example.com".into()),
        https: true,
        overview: Mutex::new(None),
    };
    let post = |headers: &[(&str, &str)], secure: bool| {
        let mut head = Head::new("POST", "/actions/retry", headers);
        head.secure = secure;
        ui.same_origin(&head).is_ok()
    };
    let host = ("Host", "127.0.0.1:8025");
    assert!(post(&[host, ("Origin", "http://127.0.0.1:8025")], false));
    assert!(!post(&[host, ("Origin", "https://127.0.0.1:8025")], false));
    assert!(post(&[host, ("Origin", "https://127.0.0.1:8025")], true));
    assert!(post(
        &[host, ("Origin", "https://outbox.example.com")],
        false
    ));
    assert!(!post(
        &[host, ("Origin", "https://outbox.example.com.evil")],
        false
    ));
    assert!(post(
        &[host, ("Referer", "https://outbox.example.com/events")],
        false
    ));
    assert!(!post(
        &[host, ("Referer", "https://outbox.example.com.evil/")],
        false
    ));
    assert!(post(&[host, ("Referer", "http://127.0.0.1:8025/")], false));
    assert!(!post(&[host], false));
    Ok(())
}
