//! The destinations' rules, on a manual clock.

use super::*;
use crate::clock::Clock;
use crate::ManualClock;

fn store(clock: &ManualClock) -> Arc<dyn Store> {
    Arc::new(
        crate::MemoryStore::builder()
            .clock(Arc::new(clock.clone()))
            .build(),
    )
}

fn lease(seq: i64) -> Lease {
    Lease {
        seq,
        id: crate::EventId::new(),
        token: seq * 7,
        attempt: 1,
    }
}

#[test]
fn probe_intervals_double_to_five_minutes() {
    let mut d = FIRST_PROBE_AFTER;
    let mut seen = vec![d.as_secs()];
    while d < MAX_PROBE_INTERVAL {
        d = next_probe_interval(d);
        seen.push(d.as_secs());
    }
    assert_eq!(seen, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
    assert_eq!(next_probe_interval(MAX_PROBE_INTERVAL), MAX_PROBE_INTERVAL);
    for probes in 0..100 {
        let j = jittered(Duration::from_secs(100), "api", probes);
        assert!(
            j >= Duration::from_secs(90) && j <= Duration::from_secs(110),
            "{j:?}"
        );
    }
    assert_ne!(
        jittered(Duration::from_secs(100), "a", 0),
        jittered(Duration::from_secs(100), "b", 0)
    );
}

#[test]
fn routes_group_types_and_other_types_stand_alone() {
    let routes = HashMap::from([
        ("note.created".to_owned(), "api".to_owned()),
        ("note.deleted".to_owned(), "api".to_owned()),
    ]);
    let d = Destinations::new(routes, None, store(&ManualClock::new()));
    assert_eq!(d.of("note.created"), "api");
    assert_eq!(d.of("mail.sent"), "mail.sent");
    let api = ["api", "note.created", "note.deleted"]
        .map(String::from)
        .to_vec();
    assert_eq!(d.types_of("api", None), Some(api.clone()));
    assert_eq!(
        d.types_of("mail.sent", None),
        Some(vec!["mail.sent".to_owned()])
    );
    let mine = ["note.created".to_owned()];
    assert_eq!(d.types_of("api", Some(&mine)), Some(mine.to_vec()));
    d.unreachable("note.deleted", &lease(1), "refused");
    assert_eq!(
        d.claimable(None),
        Selection {
            only: None,
            skip: api.clone()
        }
    );
    assert!(!d.may_run("note.created", &lease(2)));
    assert!(d.may_run("mail.sent", &lease(3)));
}

#[test]
fn a_default_destination_takes_every_type_not_routed() {
    let routes = HashMap::from([("mail.sent".to_owned(), "smtp".to_owned())]);
    let d = Destinations::new(routes, Some("api".to_owned()), store(&ManualClock::new()));
    assert_eq!((d.of("anything"), d.of("mail.sent")), ("api", "smtp"));
    d.unreachable("anything", &lease(1), "refused");
    assert_eq!(
        d.claimable(None),
        Selection {
            only: Some(vec!["mail.sent".to_owned()]),
            skip: Vec::new()
        },
        "only the routed type still flows"
    );
    assert_eq!(
        d.probe_selection("api", None),
        Selection {
            only: None,
            skip: vec!["mail.sent".to_owned()]
        }
    );
    d.unreachable("mail.sent", &lease(2), "refused");
    assert_eq!(d.claimable(None).only, Some(Vec::new()), "nothing flows");
}

/// With a default destination, a routed destination's types are the types
/// routed to it (its own name is no type), and the default's are the
/// dispatcher's types routed nowhere else: what a resume or a reached
/// destination makes due again.
#[test]
fn each_destination_names_its_own_types() {
    let routes = HashMap::from([
        ("mail.sent".to_owned(), "smtp".to_owned()),
        ("push.sent".to_owned(), "apns".to_owned()),
    ]);
    let d = Destinations::new(routes, Some("api".to_owned()), store(&ManualClock::new()));
    let mine = ["mail.sent", "note.created", "note.deleted"].map(String::from);
    assert_eq!(d.types_of("smtp", None), Some(vec!["mail.sent".to_owned()]));
    assert_eq!(
        d.types_of("smtp", Some(&mine)),
        Some(vec!["mail.sent".to_owned()])
    );
    assert_eq!(d.types_of("apns", Some(&mine)), Some(Vec::new()));
    assert_eq!(
        d.types_of("api", Some(&mine)),
        Some(vec!["note.created".to_owned(), "note.deleted".to_owned()])
    );
    assert_eq!(d.types_of("api", None), None, "every type not routed");
    // The default held back: of this dispatcher's types, only those routed
    // to open destinations flow; never a type it does not handle.
    d.unreachable("note.created", &lease(1), "refused");
    assert_eq!(
        d.claimable(Some(&mine)),
        Selection {
            only: Some(vec!["mail.sent".to_owned()]),
            skip: Vec::new()
        }
    );
}

#[test]
fn only_the_probe_runs_and_its_answer_decides() {
    let clock = ManualClock::new();
    let d = Destinations::new(HashMap::new(), None, store(&clock));
    d.unreachable("t", &lease(1), "refused");
    // A second event that was already running does not move the probe.
    d.unreachable("t", &lease(2), "refused again");
    let first = d.next_probe_at().expect("a probe is planned");
    assert!(d.probes_due().is_empty());
    clock.advance(Duration::from_millis(1100));
    assert_eq!(d.probes_due(), ["t"]);
    assert_eq!(d.snapshot()[0].next_probe_at, Some(first));
    d.probe_sent("t", &lease(3));
    assert!(d.probes_due().is_empty(), "one probe at a time");
    assert_eq!(d.next_probe_at(), None);
    assert_eq!(d.snapshot()[0].next_probe_at, None, "the probe is out");
    assert!(d.may_run("t", &lease(3)) && !d.may_run("t", &lease(4)));
    d.unreachable("t", &lease(3), "still refused");
    let second = d.next_probe_at().expect("the next probe");
    assert!(
        second - first >= chrono::Duration::milliseconds(1700),
        "backs off"
    );
    let state = d.snapshot();
    assert_eq!(state[0].hold, Hold::Unreachable);
    assert_eq!(state[0].last_error.as_deref(), Some("still refused"));
    clock.advance(Duration::from_secs(3));
    d.probe_sent("t", &lease(5));
    assert_eq!(d.reached("t", &lease(5)).as_deref(), Some("t"));
    assert!(d.snapshot().is_empty());
    assert_eq!(
        d.claimable(None),
        Selection {
            only: None,
            skip: Vec::new()
        }
    );
}

#[test]
fn paused_destinations_wait_for_resume_and_offline_stops_all() {
    let clock = ManualClock::new();
    let d = Destinations::new(HashMap::new(), None, store(&clock));
    d.pause("t");
    clock.advance(Duration::from_secs(3600));
    assert!(d.probes_due().is_empty(), "no probes while paused");
    assert_eq!(
        d.reached("t", &lease(1)),
        None,
        "a late answer does not resume"
    );
    assert_eq!(d.snapshot()[0].hold, Hold::Paused);
    assert_eq!(d.snapshot()[0].next_probe_at, None, "paused: never probed");
    assert!(d.resume("t") && !d.resume("t"));
    d.set_online(false);
    assert!(d.is_offline() && !d.may_run("other", &lease(2)));
    d.unreachable("x", &lease(3), "down");
    clock.advance(Duration::from_secs(10));
    assert!(d.probes_due().is_empty() && d.next_probe_at().is_none());
    d.set_online(true);
    assert!(d.snapshot().is_empty() && d.may_run("x", &lease(4)));
    // Going online releases what was unreachable, not what the app paused:
    // a pause holds until `resume`.
    d.pause("p");
    d.unreachable("y", &lease(5), "down");
    d.set_online(false);
    d.set_online(true);
    let held = d.snapshot();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].name.as_str(), held[0].hold), ("p", Hold::Paused));
    assert!(d.may_run("y", &lease(6)) && !d.may_run("p", &lease(7)));
}

/// Each probe of a destination draws its own jitter: successive waits are
/// not all the same fraction of their backoff, so destinations that went
/// down together drift apart.
#[test]
fn successive_probes_are_jittered_differently() {
    let clock = ManualClock::new();
    let d = Destinations::new(HashMap::new(), None, store(&clock));
    d.unreachable("t", &lease(1), "refused");
    let mut backoff = FIRST_PROBE_AFTER;
    let mut fractions = Vec::new();
    for seq in 2..8 {
        let now = clock.now();
        let at = d.next_probe_at().expect("a probe is planned");
        let wait = (at - now).to_std().expect("in the future");
        fractions.push((wait.as_secs_f64() / backoff.as_secs_f64() * 1000.0).round() as i64);
        clock.set(at);
        assert_eq!(d.probes_due(), ["t"]);
        d.probe_sent("t", &lease(seq));
        d.unreachable("t", &lease(seq), "still refused");
        backoff = next_probe_interval(backoff);
    }
    fractions.sort_unstable();
    fractions.dedup();
    assert!(
        fractions.len() > 1,
        "one jitter for every probe: {fractions:?}"
    );
}

/// A probe that finds nothing waiting lets an unreachable destination go
/// (the next event finds out); a paused one stays paused.
#[test]
fn a_probe_with_nothing_to_send_lets_the_destination_go_unless_paused() {
    let d = Destinations::new(HashMap::new(), None, store(&ManualClock::new()));
    d.unreachable("down", &lease(1), "refused");
    d.pause("paused");
    assert_eq!(d.snapshot().len(), 2);
    d.nothing_to_probe("down");
    d.nothing_to_probe("paused");
    let left: Vec<String> = d.snapshot().into_iter().map(|s| s.name).collect();
    assert_eq!(left, ["paused"]);
    assert!(d.may_run("down", &lease(2)) && !d.may_run("paused", &lease(3)));
}
