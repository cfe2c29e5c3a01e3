//! Unit and property tests for the HLC. All of them run on [`ManualClock`]: none sleeps
//! or reads the system time, except the one that checks [`SystemClock`] is sane.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// A wall time in late 2024, far from both ends of the 48-bit range.
const T0: u64 = 1_732_270_000_000;

fn manual(ms: u64) -> (ManualClock, HybridClock<ManualClock>) {
    let wall = ManualClock::new(ms);
    (wall.clone(), HybridClock::new(wall))
}

#[test]
fn layout_is_48_bits_ms_and_16_bits_logical() {
    let hlc = Hlc::from_parts(T0 + 123, 5);
    assert_eq!(hlc.physical_ms(), T0 + 123);
    assert_eq!(hlc.logical(), 5);
    assert_eq!(hlc.as_u64(), ((T0 + 123) << 16) | 5);
    assert_eq!(Hlc::from_u64(hlc.as_u64()), hlc);
    assert_eq!(
        Hlc::from_parts(u64::MAX, 7).physical_ms(),
        Hlc::MAX_PHYSICAL_MS
    );
    assert_eq!(Hlc::from_parts(Hlc::MAX_PHYSICAL_MS, u16::MAX), Hlc::MAX);
    // +1 on the raw value carries a full logical counter into the milliseconds.
    assert_eq!(
        Hlc::from_parts(T0, u16::MAX).checked_next(),
        Some(Hlc::from_parts(T0 + 1, 0))
    );
    assert_eq!(Hlc::MAX.checked_next(), None);
    assert_eq!(Hlc::MAX.saturating_next(), Hlc::MAX);
}

#[test]
fn text_and_serde_forms() {
    let hlc = Hlc::from_parts(1_732_270_000_123, 5);
    assert_eq!(hlc.to_string(), "1732270000123.5");
    assert_eq!(format!("{hlc:?}"), "Hlc(1732270000123.5)");
    assert_eq!("1732270000123.5".parse::<Hlc>().unwrap(), hlc);
    assert_eq!(
        serde_json::to_string(&hlc).unwrap(),
        hlc.as_u64().to_string()
    );
    let id = EventId::new(hlc, 3);
    assert_eq!(id.to_string(), "1732270000123.5@3");
    assert_eq!("1732270000123.5@3".parse::<EventId>().unwrap(), id);

    for bad in [
        "",
        "1",
        ".5",
        "1.",
        "1.05",
        "01.5",
        "+1.5",
        "-1.5",
        " 1.5",
        "1.5 ",
        "1.65536",
        "1.5.5",
        "281474976710656.0",
        "x.y",
    ] {
        let err = bad.parse::<Hlc>().unwrap_err();
        assert!(matches!(err, HlcError::Parse { .. }), "{bad:?}: {err}");
    }
    for bad in ["1.5", "1.5@", "1.5@65536", "1.5@03", "1.05@3"] {
        assert!(bad.parse::<EventId>().is_err(), "{bad:?}");
    }
}

#[test]
fn event_ids_order_by_hlc_then_origin() {
    let a = EventId::new(Hlc::from_parts(T0, 1), 9);
    let b = EventId::new(Hlc::from_parts(T0, 2), 1);
    let c = EventId::new(Hlc::from_parts(T0, 2), 2);
    let mut ids = vec![c, a, b];
    ids.sort();
    assert_eq!(ids, vec![a, b, c]);
}

#[test]
fn now_follows_wall_and_bumps_logical_on_tie_or_regression() {
    let (wall, clock) = manual(T0);
    assert_eq!(clock.now().unwrap(), Hlc::from_parts(T0, 0));
    assert_eq!(clock.now().unwrap(), Hlc::from_parts(T0, 1));
    wall.advance(5);
    assert_eq!(clock.now().unwrap(), Hlc::from_parts(T0 + 5, 0));
    wall.set(T0 - 1_000); // NTP step backwards
    assert_eq!(clock.now().unwrap(), Hlc::from_parts(T0 + 5, 1));
    assert_eq!(clock.last(), Hlc::from_parts(T0 + 5, 1));
}

#[test]
fn logical_overflow_advances_physical() {
    let (_wall, clock) = manual(T0);
    clock.advance_to(Hlc::from_parts(T0, u16::MAX - 1)).unwrap();
    assert_eq!(clock.now().unwrap(), Hlc::from_parts(T0, u16::MAX));
    assert_eq!(clock.now().unwrap(), Hlc::from_parts(T0 + 1, 0));
}

#[test]
fn observe_follows_the_standard_receive_rule() {
    let (wall, clock) = manual(T0);
    clock.now().unwrap(); // last = T0.0
                          // Remote ahead in the same millisecond as wall: max(last, remote) + 1.
    let r = Hlc::from_parts(T0, 7);
    assert_eq!(clock.observe(r).unwrap(), Hlc::from_parts(T0, 8));
    // Remote behind: local last + 1.
    assert_eq!(
        clock.observe(Hlc::from_parts(T0 - 50, 3)).unwrap(),
        Hlc::from_parts(T0, 9)
    );
    // Wall ahead of both: wall with logical 0.
    wall.advance(10);
    assert_eq!(
        clock.observe(Hlc::from_parts(T0 + 2, 0)).unwrap(),
        Hlc::from_parts(T0 + 10, 0)
    );
    assert_eq!(clock.clock_skew_events(), 0);
}

#[test]
fn far_ahead_remote_is_merged_and_counted() {
    let (_wall, clock) = manual(T0);
    let remote = Hlc::from_parts(T0 + 500, 4); // exactly at the limit: not skew
    assert_eq!(clock.observe(remote).unwrap(), Hlc::from_parts(T0 + 500, 5));
    assert_eq!(clock.clock_skew_events(), 0);
    let remote = Hlc::from_parts(T0 + 60_000, 0);
    assert_eq!(
        clock.observe(remote).unwrap(),
        Hlc::from_parts(T0 + 60_000, 1)
    );
    assert_eq!(clock.clock_skew_events(), 1);
    // The skewed remote is now part of local time: later stamps follow it.
    assert_eq!(clock.now().unwrap(), Hlc::from_parts(T0 + 60_000, 2));
    let strict = HybridClock::with_config(
        ManualClock::new(T0),
        HlcConfig {
            max_clock_offset_ms: 10,
            ..HlcConfig::default()
        },
    );
    strict.observe(Hlc::from_parts(T0 + 11, 0)).unwrap();
    assert_eq!(strict.clock_skew_events(), 1);
}

/// Collects `(field, value)` pairs and messages of every event, to check that skew is
/// logged with structured fields rather than a formatted string.
#[derive(Debug, Default)]
struct Events(std::sync::Mutex<Vec<Vec<(String, String)>>>);

impl tracing::Subscriber for Events {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Fields(Vec<(String, String)>);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
                self.0.push((field.name().to_owned(), format!("{value:?}")));
            }
        }
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn skew_is_logged_with_structured_fields() {
    let events = Arc::new(Events::default());
    tracing::subscriber::with_default(Arc::clone(&events), || {
        let (_wall, clock) = manual(T0);
        clock.observe(Hlc::from_parts(T0 + 400, 0)).unwrap();
        clock.observe(Hlc::from_parts(T0 + 2_000, 0)).unwrap();
    });
    let logged = events.0.lock().unwrap();
    assert_eq!(
        logged.len(),
        1,
        "only the far-ahead remote is logged: {logged:?}"
    );
    let mut got: Vec<(&str, &str)> = logged[0]
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    got.sort_unstable();
    let (remote, local) = ((T0 + 2_000).to_string(), T0.to_string());
    let want = [
        ("local_ms", local.as_str()),
        ("max_offset_ms", "500"),
        ("message", "remote clock ahead"),
        ("offset_ms", "2000"),
        ("remote_ms", remote.as_str()),
    ];
    assert_eq!(got, want);
}

#[test]
fn advance_to_never_lowers_and_does_not_count_skew() {
    let (_wall, clock) = manual(T0);
    let ahead = Hlc::from_parts(T0 + 10_000, 0);
    assert_eq!(clock.advance_to(ahead).unwrap(), ahead);
    assert_eq!(clock.advance_to(Hlc::from_parts(T0, 0)).unwrap(), ahead);
    assert!(clock.now().unwrap() > ahead);
    assert_eq!(clock.clock_skew_events(), 0);
}

#[test]
fn exhausted_clock_errors_instead_of_repeating() {
    let (_wall, clock) = manual(T0);
    assert!(matches!(
        clock.observe(Hlc::MAX),
        Err(HlcError::Exhausted { .. })
    ));
    assert_eq!(clock.last(), Hlc::ZERO, "a failed observe changes nothing");
    clock.advance_to(Hlc::MAX).unwrap();
    assert!(matches!(clock.now(), Err(HlcError::Exhausted { .. })));
}

#[test]
fn final_hlc_takes_the_max_of_its_three_inputs() {
    let prev = Hlc::from_parts(T0, 3);
    assert_eq!(final_hlc(None, T0 - 5, prev), Hlc::from_parts(T0, 4));
    assert_eq!(final_hlc(None, T0 + 1, prev), Hlc::from_parts(T0 + 1, 0));
    let stamp = Hlc::from_parts(T0 + 1, 9);
    assert_eq!(final_hlc(Some(stamp), T0 + 1, prev), stamp);
    assert_eq!(final_hlc(Some(Hlc::ZERO), 0, prev), Hlc::from_parts(T0, 4));
}

#[test]
fn durable_clock_reserves_ahead_and_writes_once_per_window() {
    let wall = ManualClock::new(T0);
    let store = MemoryStore::new();
    let clock = HybridClock::open(wall.clone(), HlcConfig::default(), store.clone()).unwrap();
    assert_eq!(store.writes(), 1, "open reserves eagerly");
    assert_eq!(store.value(), Some(Hlc::from_parts(T0 + 1_000, 0)));
    for _ in 0..10_000 {
        clock.now().unwrap();
    }
    wall.advance(999);
    clock.now().unwrap();
    assert_eq!(store.writes(), 1, "still inside the first window");
    wall.advance(2);
    let issued = clock.now().unwrap();
    assert_eq!(store.writes(), 2);
    assert_eq!(clock.ceiling(), store.value());
    assert!(store.value().unwrap() >= issued);
}

#[test]
fn failed_reservation_issues_nothing_past_the_ceiling() {
    let wall = ManualClock::new(T0);
    let store = MemoryStore::new();
    let clock = HybridClock::open(wall.clone(), HlcConfig::default(), store.clone()).unwrap();
    let ceiling = clock.ceiling().unwrap();
    store.set_failing(true);
    assert!(
        clock.now().unwrap() <= ceiling,
        "inside the window: no write"
    );
    wall.advance(5_000);
    assert!(matches!(clock.now(), Err(HlcError::Io { .. })));
    assert!(clock.last() <= ceiling);
    store.set_failing(false);
    assert!(clock.now().unwrap() > ceiling);
}

#[test]
fn restart_on_file_store_continues_above_everything_issued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hlc.high-water");
    let wall = ManualClock::new(T0);
    let first = HybridClock::open(wall.clone(), HlcConfig::default(), FileStore::new(&path));
    let first = first.unwrap();
    let mut issued = first.now().unwrap();
    for _ in 0..100 {
        issued = first.now().unwrap();
    }
    drop(first);
    wall.set(T0 - 60_000); // the machine comes back with a slow clock
    let second = HybridClock::open(wall, HlcConfig::default(), FileStore::new(&path)).unwrap();
    assert!(second.now().unwrap() > issued);

    std::fs::write(&path, "garbage").unwrap();
    let err = HybridClock::open(
        ManualClock::new(T0),
        HlcConfig::default(),
        FileStore::new(&path),
    )
    .unwrap_err();
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn concurrent_now_never_repeats() {
    let wall = ManualClock::new(T0);
    let clock = Arc::new(
        HybridClock::open(
            wall.clone(),
            HlcConfig {
                reserve_window_ms: 1,
                ..HlcConfig::default()
            },
            MemoryStore::new(),
        )
        .unwrap(),
    );
    let per_thread = 5_000;
    let mut all: Vec<Hlc> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|i| {
                let clock = Arc::clone(&clock);
                let wall = wall.clone();
                scope.spawn(move || {
                    let mut mine = Vec::with_capacity(per_thread);
                    for n in 0..per_thread {
                        if i == 0 && n % 100 == 0 {
                            wall.advance(1);
                        }
                        let hlc = clock.now().unwrap();
                        if let Some(&prev) = mine.last() {
                            assert!(hlc > prev);
                        }
                        mine.push(hlc);
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4 * per_thread);
    assert!(clock.ceiling().unwrap() >= *all.last().unwrap());
}

#[test]
fn system_clock_is_after_2024() {
    assert!(SystemClock.wall_ms() > T0);
}

#[test]
fn config_has_documented_defaults_and_rejects_unknown_fields() {
    let config: HlcConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(config.max_clock_offset_ms, 500);
    assert_eq!(config.reserve_window_ms, 1_000);
    assert!(serde_json::from_str::<HlcConfig>(r#"{"max_offset": 1}"#).is_err());
}

/// One step of a property-test scenario.
#[derive(Debug, Clone)]
enum Op {
    /// Move the wall clock by this many ms (negative: backwards).
    Wall(i64),
    Now,
    /// Observe a remote at wall time + this many ms, with this logical part.
    Observe(i64, u16),
    /// Drop the clock and open a new one on the same store (durable scenarios only).
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (-2_000i64..2_000).prop_map(Op::Wall),
        4 => Just(Op::Now),
        3 => (-2_000i64..2_000, any::<u16>()).prop_map(|(d, l)| Op::Observe(d, l)),
        1 => Just(Op::Restart),
    ]
}

fn shifted(ms: u64, delta: i64) -> u64 {
    ms.saturating_add_signed(delta)
}

/// Runs `ops`, checking after every step that what the clock returned is strictly
/// greater than everything it (or an earlier incarnation, when durable) returned.
fn run(ops: &[Op], durable: bool) -> Result<(), TestCaseError> {
    let wall = ManualClock::new(T0);
    let store = MemoryStore::new();
    let open = || {
        if durable {
            HybridClock::open(wall.clone(), HlcConfig::default(), store.clone()).unwrap()
        } else {
            HybridClock::new(wall.clone())
        }
    };
    let mut clock = open();
    let mut highest = Hlc::ZERO;
    for op in ops {
        match *op {
            Op::Wall(delta) => wall.set(shifted(wall.wall_ms(), delta)),
            Op::Now => {
                let hlc = clock.now().unwrap();
                prop_assert!(hlc > highest, "now {hlc} after {highest}");
                prop_assert!(hlc.physical_ms() >= wall.wall_ms());
                highest = hlc;
            }
            Op::Observe(delta, logical) => {
                let remote = Hlc::from_parts(shifted(wall.wall_ms(), delta), logical);
                let before = clock.last();
                let hlc = clock.observe(remote).unwrap();
                prop_assert!(hlc > before && hlc > remote && hlc > highest);
                highest = hlc;
            }
            Op::Restart if durable => {
                drop(clock);
                clock = open();
            }
            Op::Restart => {}
        }
        if durable {
            prop_assert!(store.value().unwrap() >= highest, "issued above ceiling");
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn now_and_observe_are_strictly_monotonic(ops in prop::collection::vec(op(), 1..200)) {
        run(&ops, false)?;
    }

    #[test]
    fn restarts_never_reissue(ops in prop::collection::vec(op(), 1..200)) {
        run(&ops, true)?;
    }

    #[test]
    fn skew_is_counted_only_beyond_max_offset(
        max_offset in 0u64..1_000,
        deltas in prop::collection::vec((-3_000i64..3_000, any::<u16>()), 1..50),
    ) {
        let wall = ManualClock::new(T0);
        let config = HlcConfig { max_clock_offset_ms: max_offset, ..HlcConfig::default() };
        let clock = HybridClock::with_config(wall.clone(), config);
        let mut expected = 0;
        for (delta, logical) in deltas {
            let remote = Hlc::from_parts(shifted(T0, delta), logical);
            if delta > 0 && delta.unsigned_abs() > max_offset {
                expected += 1;
            }
            clock.observe(remote).unwrap();
            prop_assert_eq!(clock.clock_skew_events(), expected);
        }
    }

    #[test]
    fn final_hlc_is_strictly_increasing(
        start in any::<u64>().prop_map(|raw| Hlc::from_u64(raw >> 1)),
        txns in prop::collection::vec(
            (prop::option::of(any::<u64>().prop_map(|raw| Hlc::from_u64(raw >> 1))),
             0u64..Hlc::MAX_PHYSICAL_MS),
            1..100,
        ),
    ) {
        let mut previous = start;
        for (stamp, commit_ms) in txns {
            let next = final_hlc(stamp, commit_ms, previous);
            prop_assert!(next > previous);
            prop_assert!(next >= Hlc::from_parts(commit_ms, 0));
            if let Some(stamp) = stamp {
                prop_assert!(next >= stamp);
            }
            previous = next;
        }
    }

    #[test]
    fn text_round_trips(raw in any::<u64>(), origin in any::<u16>()) {
        let hlc = Hlc::from_u64(raw);
        prop_assert_eq!(hlc.to_string().parse::<Hlc>().unwrap(), hlc);
        let id = EventId::new(hlc, origin);
        prop_assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let json = serde_json::to_string(&hlc).unwrap();
        prop_assert_eq!(serde_json::from_str::<Hlc>(&json).unwrap(), hlc);
    }

    #[test]
    fn event_id_order_is_lexicographic(a in any::<(u64, u16)>(), b in any::<(u64, u16)>()) {
        let ia = EventId::new(Hlc::from_u64(a.0), a.1);
        let ib = EventId::new(Hlc::from_u64(b.0), b.1);
        prop_assert_eq!(ia.cmp(&ib), a.cmp(&b));
    }
}
