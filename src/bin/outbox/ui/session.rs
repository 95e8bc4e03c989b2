//! Sessions without server state: a cookie is `issued.nonce.mac`, where the
//! MAC (HMAC-SHA256 under a key drawn when the process starts) covers the
//! issue time and the nonce. A form token is an HMAC of the session's
//! nonce, so it is good for that browser's session only, and a restart
//! (a new key) ends every session.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// How long a session lasts.
const LIFETIME_SECS: u64 = 12 * 3600;

pub(super) struct Sessions {
    key: hmac::Key,
    random: SystemRandom,
}

impl Sessions {
    pub(super) fn new() -> Result<Sessions, String> {
        let random = SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &random)
            .map_err(|_| "no randomness for the dashboard's sessions".to_owned())?;
        Ok(Sessions { key, random })
    }

    /// A new session: its id (the nonce) and the cookie's value.
    pub(super) fn issue(&self) -> (String, String) {
        let mut nonce = [0u8; 16];
        // The system's randomness does not fail on Linux once booted; were
        // it to, a time-derived nonce still differs per session, and the
        // MAC (whose key did come from it) still protects it.
        if self.random.fill(&mut nonce).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            nonce.copy_from_slice(&t.to_le_bytes());
        }
        let nonce = hex(&nonce);
        let issued = now_secs();
        let value = format!(
            "{issued}.{nonce}.{}",
            self.mac(&format!("session|{issued}|{nonce}"))
        );
        (nonce, value)
    }

    /// The session id of a cookie value that this process issued and that
    /// has not run out.
    pub(super) fn check(&self, value: &str) -> Option<String> {
        let mut parts = value.splitn(3, '.');
        let (issued, nonce, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let expected = self.mac(&format!("session|{issued}|{nonce}"));
        if !super::same(mac, &expected) {
            return None;
        }
        let issued: u64 = issued.parse().ok()?;
        (now_secs().saturating_sub(issued) < LIFETIME_SECS).then(|| nonce.to_owned())
    }

    /// The form token of session `id`.
    pub(super) fn csrf(&self, id: &str) -> String {
        self.mac(&format!("csrf|{id}"))
    }

    /// 128 bits of an HMAC, as hex.
    fn mac(&self, text: &str) -> String {
        let tag = hmac::sign(&self.key, text.as_bytes());
        hex(&tag.as_ref()[..16])
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_good_only_as_issued_and_only_here() -> Result<(), String> {
        let sessions = Sessions::new()?;
        let (id, value) = sessions.issue();
        assert_eq!(sessions.check(&value).as_deref(), Some(id.as_str()));
        // Another process (another key) does not know it.
        assert_eq!(Sessions::new()?.check(&value), None);
        // Any change to its parts breaks the MAC.
        let (issued, rest) = value.split_once('.').ok_or("no dot")?;
        let older = format!(
            "{}.{rest}",
            issued.parse::<u64>().map_err(|e| e.to_string())? - 1
        );
        assert_eq!(sessions.check(&older), None);
        let other_nonce = value.replacen(&id, &"0".repeat(32), 1);
        assert_eq!(sessions.check(&other_nonce), None);
        assert_eq!(sessions.check("garbage"), None);
        assert_eq!(sessions.check(""), None);
        // One that ran out.
        let old = now_secs() - LIFETIME_SECS - 1;
        let nonce = "ab".repeat(16);
        let stale = format!(
            "{old}.{nonce}.{}",
            sessions.mac(&format!("session|{old}|{nonce}"))
        );
        assert_eq!(sessions.check(&stale), None);
        // Form tokens differ per session.
        let (other, _) = sessions.issue();
        assert_ne!(sessions.csrf(&id), sessions.csrf(&other));
        assert_eq!(sessions.csrf(&id).len(), 32);
        Ok(())
    }
}
