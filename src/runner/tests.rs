//! Resuming a store: every rollout that can move is driven at once (a deadline that passed while
//! the process was down is acted on), every rollout that waits for a person stays as it is until
//! someone acts, and an edited plan file is still adopted.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::domain::plan::Plan;
use crate::engine::{DriveOutcome, Pace};
use crate::store::{DEFAULT_LOCK_WAIT, PlanRecord};

fn plan_text(name: &str, seed: u32, description: &str) -> String {
    format!(
        r#"[rollout]
name = "{name}"
description = "{description}"
observe_every = "6h"

[policy]
compliance = "Resume {name}"
platform = "windows"

[provider]
kind = "simulator"
devices = 20
seed = {seed}

[[phase]]
id = "report"
mode = "report"
include = ["All Users"]
min_soak = "1d"

[phase.gate]
min_reporting = "50%"

[[phase]]
id = "notify"
mode = "notify"
include = ["All Users"]
grace = "7d"
min_soak = "1d"

[phase.gate]
approvals = 1
"#
    )
}

fn engine(store: &Store) -> Engine<'_> {
    Engine {
        store,
        notifier: crate::notifier::shared(),
        actor: "test".into(),
        delivery: crate::retry::Backoff::WEBHOOK,
        limits: Limits::default(),
    }
}

/// Starts a rollout of plan `name` (its file at `path`) and drives it until it soaks, waiting for
/// its next observation.
async fn soaking(store: &Store, name: &str, seed: u32, path: &Path) -> (String, Plan) {
    let text = plan_text(name, seed, "first");
    let path = path.to_string_lossy().into_owned();
    let plan = crate::adapters::parse_plan(&path, &text).unwrap();
    let record = PlanRecord {
        path,
        source: text,
        hash: plan.hash.clone(),
    };
    let id = format!("{name}-1");
    let engine = engine(store);
    let mut provider = provider::connect(&plan.provider, store).await.unwrap();
    engine
        .start(&plan, record, &id, "alice", provider.as_mut())
        .await
        .unwrap();
    let mut quiet = |_: &Plan, _: &crate::domain::rollout::Rollout, _: &EventRecord| {};
    let outcome = engine
        .drive(&id, provider.as_mut(), Pace::Once, &mut quiet)
        .await
        .unwrap();
    assert!(matches!(outcome, DriveOutcome::Wait(_)), "{outcome:?}");
    assert_eq!(
        store.rollout(&id).unwrap().rollout.status,
        RolloutStatus::Running
    );
    (id, plan)
}

/// Moves a simulated tenant's clock on, as if the process had been down that long.
async fn time_passes(store: &Store, plan: &Plan, by: Duration) {
    let mut provider = provider::connect(&plan.provider, store).await.unwrap();
    let at = provider.now().plus(by);
    provider.advance_to(at).await.unwrap();
}

fn serve_settings() -> Settings {
    Settings {
        actor: "serve".into(),
        until: Until::Shutdown,
        only: None,
        once: false,
        limits: Limits::default(),
        leasing: None,
    }
}

/// Every announcement of a runner, kept as it comes.
struct Seen {
    watch: broadcast::Receiver<Announcement>,
    log: Vec<Announcement>,
}

impl Seen {
    /// The first announcement about `rollout` that `wanted` accepts, waiting for it if need be.
    async fn first(
        &mut self,
        rollout: &str,
        wanted: impl Fn(&Announcement) -> bool,
    ) -> Announcement {
        let matches = |a: &Announcement| a.rollout == rollout && wanted(a);
        if let Some(a) = self.log.iter().find(|a| matches(a)) {
            return a.clone();
        }
        let wait = async {
            loop {
                match self.watch.recv().await {
                    Ok(a) => {
                        self.log.push(a.clone());
                        if matches(&a) {
                            return a;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        panic!("{n} announcements were missed")
                    }
                    Err(e) => panic!("the runner stopped announcing: {e}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait)
            .await
            .unwrap_or_else(|_| panic!("no such announcement for `{rollout}`"))
    }
}

#[tokio::test]
async fn reopening_drives_what_is_due_and_leaves_what_waits_for_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let plans = dir.path().join("plans");
    std::fs::create_dir_all(&plans).unwrap();
    let (due, paused, untouched, edited) = {
        let store = Store::open(&dir.path().join("store"), DEFAULT_LOCK_WAIT).unwrap();
        let (due, due_plan) = soaking(&store, "due", 1, &plans.join("due.toml")).await;
        let (paused, _) = soaking(&store, "paused", 2, &plans.join("paused.toml")).await;
        let (untouched, _) = soaking(&store, "untouched", 3, &plans.join("untouched.toml")).await;
        let edited_path = plans.join("edited.toml");
        let (edited, _) = soaking(&store, "edited", 4, &edited_path).await;
        let engine = engine(&store);
        for id in [&paused, &untouched, &edited] {
            let now = store.rollout(id).unwrap().rollout.updated_at;
            engine
                .submit(id, EventKind::PauseRequested, "bob", "hold on", now)
                .unwrap()
                .unwrap();
        }
        // Down for two days: the due rollout's observation deadline has long passed.
        time_passes(&store, &due_plan, Duration::from_secs(2 * 86_400)).await;
        // Someone edits a paused rollout's plan file meanwhile.
        std::fs::write(&edited_path, plan_text("edited", 4, "second")).unwrap();
        store.flush().unwrap();
        (due, paused, untouched, edited)
    };
    let before = |store: &Store, id: &str| store.rollout(id).unwrap().rollout.last_seq;

    let store = Arc::new(Store::open(&dir.path().join("store"), DEFAULT_LOCK_WAIT).unwrap());
    let untouched_seq = before(&store, &untouched);
    let edited_before = store.rollout(&edited).unwrap().rollout.plan_hash;
    let due_seq = before(&store, &due);
    let runner = Runner::new(store.clone(), crate::notifier::shared(), serve_settings());
    let handle = runner.handle();
    let mut seen = Seen {
        watch: handle.subscribe(),
        log: Vec::new(),
    };
    let mut resumed = handle.resumed();
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let running = tokio::spawn(runner.run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));

    tokio::time::timeout(Duration::from_secs(60), resumed.wait_for(|r| *r))
        .await
        .expect("the runner resumes")
        .unwrap();
    // The deadline that passed is acted on: the rollout is observed on the tenant's clock.
    let observed = seen
        .first(&due, |a| {
            matches!(a.record.event.kind, EventKind::Observed { .. })
        })
        .await;
    assert!(observed.record.seq > due_seq);
    // The edited plan file of a paused rollout is noticed and reported, not adopted, and it
    // stays paused.
    let changed = seen
        .first(&edited, |a| {
            matches!(a.record.event.kind, EventKind::PlanFileChanged { .. })
        })
        .await;
    assert_eq!(changed.status, RolloutStatus::Paused);
    let edited_now = store.rollout(&edited).unwrap().rollout;
    assert_eq!(edited_now.plan_hash, edited_before);
    assert!(edited_now.plan_file.is_some());
    // The rollout driven goes as far as it can without a person.
    seen.first(&due, |a| a.status == RolloutStatus::WaitingApproval)
        .await;
    // A paused rollout gets its actor when a person acts on it, and moves on.
    let resumed_record = handle
        .command(&paused, EventKind::ResumeRequested, "bob", "go on")
        .await
        .unwrap()
        .expect("resume changes the rollout");
    assert_eq!(resumed_record.status, RolloutStatus::Running);
    seen.first(&paused, |a| {
        matches!(a.record.event.kind, EventKind::Observed { .. })
    })
    .await;

    stop_tx.send(true).unwrap();
    let report = running.await.unwrap().unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // The paused rollout nobody touched was never driven: not a single event more.
    assert_eq!(before(&store, &untouched), untouched_seq);
    assert_eq!(
        store.rollout(&untouched).unwrap().rollout.status,
        RolloutStatus::Paused
    );
    assert!(!report.rollouts.contains_key(&untouched));
    assert_eq!(
        report.rollouts.get(&due),
        Some(&RolloutStatus::WaitingApproval)
    );
    let edited_now = store.rollout(&edited).unwrap().rollout;
    assert_eq!(edited_now.status, RolloutStatus::Paused);
    assert_ne!(
        edited_now.plan_hash,
        store.rollout(&untouched).unwrap().rollout.plan_hash
    );
}

#[tokio::test]
async fn run_until_idle_reports_every_unfinished_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let plans = dir.path().join("plans");
    let paused = {
        let store = Store::open(&dir.path().join("store"), DEFAULT_LOCK_WAIT).unwrap();
        let (paused, _) = soaking(&store, "paused", 7, &plans.join("paused.toml")).await;
        let now = store.rollout(&paused).unwrap().rollout.updated_at;
        engine(&store)
            .submit(&paused, EventKind::PauseRequested, "bob", "hold on", now)
            .unwrap();
        paused
    };
    let store = Arc::new(Store::open(&dir.path().join("store"), DEFAULT_LOCK_WAIT).unwrap());
    let settings = Settings {
        until: Until::Idle,
        ..serve_settings()
    };
    let runner = Runner::new(store, crate::notifier::shared(), settings);
    let mut resumed = runner.handle().resumed();
    let report = runner.run(std::future::pending()).await.unwrap();
    assert_eq!(report.rollouts.get(&paused), Some(&RolloutStatus::Paused));
    assert!(*resumed.borrow_and_update());
}

/// A paused rollout waits for a person, but its exception ends at its time: when the tenant's
/// (virtual) clock passed the end while the process was down, the daemon gives the rollout an
/// actor at once, which records the expiry and drives nothing else; the rollout stays paused.
#[tokio::test]
async fn a_paused_rollouts_exception_ends_at_its_time_under_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let plans = dir.path().join("plans");
    std::fs::create_dir_all(&plans).unwrap();
    let (id, until, paused_seq) = {
        let store = Store::open(&dir.path().join("store"), DEFAULT_LOCK_WAIT).unwrap();
        let (id, plan) = soaking(&store, "excepted", 6, &plans.join("excepted.toml")).await;
        let engine = engine(&store);
        let now = store.rollout(&id).unwrap().rollout.updated_at;
        engine
            .submit(
                &id,
                EventKind::ExceptionGranted {
                    name: "trip".into(),
                    subject: crate::domain::rollout::Subject::User("carol@example.com".into()),
                    until: crate::domain::event::Until::AfterSecs(3 * 86_400),
                },
                "dana",
                "travelling",
                now,
            )
            .unwrap()
            .unwrap();
        let record = engine
            .submit(&id, EventKind::PauseRequested, "bob", "hold on", now)
            .unwrap()
            .unwrap();
        let rollout = store.rollout(&id).unwrap().rollout;
        assert_eq!(rollout.status, RolloutStatus::Paused);
        // Down for four days: the exception's end has passed.
        time_passes(&store, &plan, Duration::from_secs(4 * 86_400)).await;
        store.flush().unwrap();
        (id, rollout.exceptions[0].until, record.seq)
    };

    let store = Arc::new(Store::open(&dir.path().join("store"), DEFAULT_LOCK_WAIT).unwrap());
    let runner = Runner::new(store.clone(), crate::notifier::shared(), serve_settings());
    let handle = runner.handle();
    let mut seen = Seen {
        watch: handle.subscribe(),
        log: Vec::new(),
    };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let running = tokio::spawn(runner.run(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let expired = seen
        .first(&id, |a| {
            matches!(a.record.event.kind, EventKind::ExceptionExpired { .. })
        })
        .await;
    assert_eq!(expired.status, RolloutStatus::Paused);
    assert!(expired.record.at >= until, "recorded once its time came");
    stop_tx.send(true).unwrap();
    let report = running.await.unwrap().unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let rollout = store.rollout(&id).unwrap().rollout;
    assert_eq!(rollout.status, RolloutStatus::Paused);
    assert!(rollout.exceptions.is_empty());
    // Nothing but the expiry was recorded during the pause: no observation, no promotion.
    let after: Vec<EventKind> = store
        .events(&id)
        .unwrap()
        .into_iter()
        .filter(|r| r.seq > paused_seq)
        .map(|r| r.event.kind)
        .collect();
    assert!(
        matches!(after.as_slice(), [EventKind::ExceptionExpired { .. }]),
        "{after:?}"
    );
}

/// A command forwarded to an owner whose lease ran out before it took the command (the owner was
/// killed or paused) is withdrawn as soon as the lease is gone and comes back untaken, for the
/// runner to give to the next owner, instead of waiting out `FORWARD_WAIT`.
#[tokio::test]
async fn a_command_forwarded_to_an_owner_that_lost_its_lease_comes_back_untaken() {
    let server = crate::test_postgres::shared();
    let url = server.database();
    let store = Store::open(Path::new(&url), DEFAULT_LOCK_WAIT).unwrap();
    let owner = Store::open(Path::new(&url), DEFAULT_LOCK_WAIT).unwrap();
    owner.set_replica("replica-gone");
    assert_eq!(
        owner.acquire_lease("r-1", Duration::from_secs(1)).unwrap(),
        Some(1)
    );
    let forwarded = Forwarded {
        rollout: "r-1".into(),
        kind: EventKind::PauseRequested,
        plan: None,
        by: "bob".into(),
        reason: "look".into(),
    };
    let started = Instant::now();
    let ended = forward_and_wait(&store, "replica-gone", forwarded)
        .await
        .unwrap();
    assert!(
        matches!(&ended, Forwarding::OwnerGone(f) if f.rollout == "r-1" && f.by == "bob"),
        "the command was not handed back"
    );
    assert!(started.elapsed() < FORWARD_WAIT, "{:?}", started.elapsed());
    assert!(
        store.tree(FORWARDED).scan_prefix(b"").unwrap().is_empty(),
        "the command was left for an owner that is gone"
    );
    assert_eq!(store.lease_holder("r-1").unwrap(), None);
}
