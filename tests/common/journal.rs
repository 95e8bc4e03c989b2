//! The checker of the process tests, in the manner of a Jepsen total-queue
//! check: from journals and a final read of the table, what was lost,
//! delivered twice without cause, or acknowledged after its lease moved on.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// One parsed journal line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Claim {
        id: String,
        attempt: u32,
        at: i64,
        token: i64,
    },
    Start {
        id: String,
        attempt: u32,
        at: i64,
    },
    Ack {
        id: String,
        attempt: u32,
        accepted: bool,
        kind: String,
        at: i64,
    },
    /// An ack about to be sent; its outcome line follows unless the worker
    /// was killed in between.
    AckSent {
        id: String,
        attempt: u32,
        at: i64,
    },
}

/// Reads journals, ignoring a torn last line (the writer was killed).
pub fn read(paths: &[impl AsRef<Path>]) -> std::io::Result<Vec<Entry>> {
    let mut out = Vec::new();
    for path in paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let num = |i: usize| f.get(i).and_then(|s| s.parse::<i64>().ok());
            let entry = match (f.first().copied(), f.len()) {
                (Some("claim"), 5) => {
                    num(2)
                        .zip(num(3))
                        .zip(num(4))
                        .map(|((a, t), k)| Entry::Claim {
                            id: f[1].into(),
                            attempt: a as u32,
                            at: t,
                            token: k,
                        })
                }
                (Some("asent"), 4) => num(2).zip(num(3)).map(|(a, t)| Entry::AckSent {
                    id: f[1].into(),
                    attempt: a as u32,
                    at: t,
                }),
                (Some("hstart"), 4) => num(2).zip(num(3)).map(|(a, t)| Entry::Start {
                    id: f[1].into(),
                    attempt: a as u32,
                    at: t,
                }),
                (Some("ack"), 6) => {
                    num(2)
                        .zip(num(3))
                        .zip(num(5))
                        .map(|((a, acc), t)| Entry::Ack {
                            id: f[1].into(),
                            attempt: a as u32,
                            accepted: acc == 1,
                            kind: f[4].into(),
                            at: t,
                        })
                }
                _ => None,
            };
            out.extend(entry);
        }
    }
    Ok(out)
}

/// The checker's findings. A run passes when every "must be 0" is 0.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Must be 0: expected events not done at the end.
    pub lost: usize,
    /// Must be 0: the same (id, attempt) claimed twice.
    pub double_claim: usize,
    /// Must be 0: an accepted ack of attempt a after attempt a' > a was claimed.
    pub late_ack_accepted: usize,
    /// Must be 0: more than one accepted `done` per id.
    pub multi_done: usize,
    /// Must be 0: a redelivery after an attempt that had been accepted as done.
    pub unjustified_dup: usize,
    /// Must be 0: a claim while an earlier claim's lease was live and unacknowledged.
    pub live_overlap: usize,
    /// Reported: acks refused because their lease had moved on.
    pub fenced: usize,
    /// Reported: ids whose handler started more than once.
    pub redelivered: usize,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.double_claim == 0
            && self.late_ack_accepted == 0
            && self.multi_done == 0
            && self.unjustified_dup == 0
            && self.live_overlap == 0
    }
}

/// Checks journals against the final set of done ids. `lease_ns` is the
/// lease the workers used.
pub fn check(
    entries: &[Entry],
    expected: &HashSet<String>,
    done: &HashSet<String>,
    lease_ns: i64,
) -> Report {
    let mut r = Report {
        lost: expected.difference(done).count(),
        ..Report::default()
    };
    let mut claims: HashMap<&str, Vec<(u32, i64)>> = HashMap::new();
    let mut seen_claims = HashSet::new();
    let mut starts: HashMap<&str, usize> = HashMap::new();
    let mut accepted_done: HashMap<&str, Vec<u32>> = HashMap::new();
    let mut accepted_acks: HashMap<&str, Vec<(u32, i64)>> = HashMap::new();
    // Acks sent, and acks whose outcome was written down, per id.
    let mut sent_acks: HashMap<&str, Vec<(u32, i64)>> = HashMap::new();
    let mut answered: HashSet<(&str, u32)> = HashSet::new();
    for e in entries {
        match e {
            Entry::Claim {
                id, attempt, at, ..
            } => {
                if !seen_claims.insert((id.as_str(), *attempt)) {
                    r.double_claim += 1;
                }
                claims.entry(id).or_default().push((*attempt, *at));
            }
            Entry::Start { id, .. } => *starts.entry(id).or_default() += 1,
            Entry::AckSent { id, attempt, at } => {
                sent_acks.entry(id).or_default().push((*attempt, *at));
            }
            Entry::Ack {
                id,
                attempt,
                accepted,
                kind,
                at,
            } => {
                answered.insert((id.as_str(), *attempt));
                if *accepted {
                    accepted_acks.entry(id).or_default().push((*attempt, *at));
                    if kind == "done" {
                        accepted_done.entry(id).or_default().push(*attempt);
                    }
                } else {
                    r.fenced += 1;
                }
            }
        }
    }
    for (id, acks) in &accepted_acks {
        let Some(cl) = claims.get(id) else { continue };
        for (attempt, at) in acks {
            // Claim times are stored in whole milliseconds: a claim at t2
            // happened before t2 + 1 ms.
            if cl
                .iter()
                .any(|(a2, t2)| a2 > attempt && t2 + 1_000_000 < *at)
            {
                r.late_ack_accepted += 1;
            }
        }
    }
    for (id, cl) in &mut claims {
        cl.sort();
        for pair in cl.windows(2) {
            let ((a1, t1), (_, t2)) = (pair[0], pair[1]);
            let acked_before = accepted_acks
                .get(id)
                .is_some_and(|acks| acks.iter().any(|(a, t)| *a == a1 && *t <= t2 + 1_000_000));
            // An ack sent in time whose worker died before writing down
            // how it went may have committed (a retry frees the event).
            let maybe_acked = !answered.contains(&(*id, a1))
                && sent_acks
                    .get(id)
                    .is_some_and(|acks| acks.iter().any(|(a, t)| *a == a1 && *t <= t2 + 1_000_000));
            if t2 - t1 < lease_ns && !acked_before && !maybe_acked {
                r.live_overlap += 1;
                eprintln!(
                    "live overlap: {id} attempt {a1} at {t1}, next claim at {t2} ({} ms later); claims {:?}; acks {:?}; starts {:?}",
                    (t2 - t1) / 1_000_000,
                    cl,
                    accepted_acks.get(id),
                    starts.get(&**id)
                );
            }
        }
    }
    for (id, dones) in &accepted_done {
        if dones.len() > 1 {
            r.multi_done += 1;
        }
        let last_claim = claims
            .get(id)
            .and_then(|c| c.iter().map(|(a, _)| *a).max())
            .unwrap_or(0);
        if dones.iter().any(|a| *a < last_claim) {
            r.unjustified_dup += 1;
        }
    }
    r.redelivered = starts.values().filter(|n| **n > 1).count();
    r
}
