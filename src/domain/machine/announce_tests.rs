//! Announcements in the machine: which moments queue which messages, with what words, and the
//! notice the first phases wait.

use std::time::Duration;

use super::tests::{Harness, PLAN, healthy};
use super::*;
use crate::domain::plan;

const HOUR: Duration = Duration::from_secs(3_600);

fn with(tables: &str) -> String {
    PLAN.replacen("[[phase]]", &format!("{tables}\n[[phase]]"), 1)
}

const ANNOUNCEMENTS: &str = r#"
[[announcement]]
channel = "email"
on = ["start", "phase", "approval", "completed"]
notice = "48h"
groups = ["Pilot IT"]
addresses = ["it@contoso.com"]
subject = "{plan}: {moment}"
template = "{rollout} {moment} {phase} for {groups}; first phase from {first_phase_at}"
smtp_host = "smtp.contoso.com"
from = "pg@contoso.com"

[[announcement]]
channel = "slack"
on = ["start"]
template = "{plan} started"
url = "https://hooks.slack.com/services/T/B/S"
"#;

/// The messages of the pending announcements, in order.
fn messages(rollout: &Rollout) -> Vec<(String, Message)> {
    rollout
        .pending
        .iter()
        .filter_map(|p| match &p.effect {
            Effect::Notify {
                to,
                message: Some(m),
                ..
            } => Some((to.kind().to_string(), m.clone())),
            _ => None,
        })
        .collect()
}

/// Confirms every pending effect: notifications delivered, the rest done.
fn settle(h: &mut Harness) {
    while let Some(pending) = h.rollout.pending.first().cloned() {
        let kind = match pending.effect {
            Effect::CaptureBaseline => EventKind::BaselineCaptured { effect: pending.id },
            Effect::Notify { .. } => EventKind::Delivered {
                effect: pending.id,
                status: 250,
            },
            _ => EventKind::Reconciled {
                effect: pending.id,
                changes: 1,
            },
        };
        h.send(kind, Trigger::new(TriggerSource::Provider, "test", ""))
            .unwrap();
    }
}

fn start(h: &mut Harness) -> Transition {
    h.user(
        EventKind::Start {
            plan_hash: h.plan.hash.clone(),
        },
        "alice",
    )
    .unwrap()
}

#[test]
fn the_start_is_announced_with_its_words_and_the_first_phase_waits_out_the_notice() {
    let mut h = Harness::new(&with(ANNOUNCEMENTS));
    let started_at = h.now;
    let t = start(&mut h);
    let names: Vec<&str> = t.effects.iter().map(|e| e.effect.name()).collect();
    assert_eq!(
        names,
        ["capture_baseline", "notify", "notify"],
        "no configuration written during the notice"
    );
    let until = started_at.plus(48 * HOUR);
    assert_eq!(h.rollout.notice_until, Some(until));
    let sent = messages(&h.rollout);
    assert_eq!(sent.len(), 2);
    let (channel, email) = &sent[0];
    assert_eq!(channel, "email");
    assert_eq!(email.moment, plan::Moment::Start);
    assert_eq!(email.subject, "test: start");
    assert_eq!(
        email.text,
        format!(
            "test-1 start  for Pilot IT; first phase from {}",
            until.rfc3339()
        )
    );
    assert_eq!(email.addresses, ["it@contoso.com"]);
    assert_eq!(sent[1].1.text, "test started");
    settle(&mut h);
    assert_eq!(h.state("pilot"), PhaseState::Pending);
    // The machine wakes at the end of the notice, not before.
    assert_eq!(agenda(&h.plan, &h.rollout, h.now).wake_at, Some(until));
    h.advance(47 * HOUR);
    h.send(
        EventKind::Tick,
        Trigger::new(TriggerSource::Schedule, "t", ""),
    )
    .unwrap();
    assert_eq!(h.state("pilot"), PhaseState::Pending);
    h.advance(HOUR);
    assert_eq!(
        agenda(&h.plan, &h.rollout, h.now).wake_at,
        Some(until),
        "a deadline that has come: the tick is due"
    );
    let t = h
        .send(
            EventKind::Tick,
            Trigger::new(TriggerSource::Schedule, "t", ""),
        )
        .unwrap();
    assert_eq!(h.state("pilot"), PhaseState::Applying);
    let names: Vec<&str> = t.effects.iter().map(|e| e.effect.name()).collect();
    assert_eq!(names, ["reconcile", "notify"], "the phase is announced too");
    let phase = &messages(&h.rollout)[0].1;
    assert_eq!(phase.moment, plan::Moment::Phase);
    assert_eq!(phase.phase.as_deref(), Some("pilot"));
    assert!(
        phase.text.starts_with("test-1 phase pilot for Pilot IT"),
        "{}",
        phase.text
    );
}

#[test]
fn approval_requests_and_the_completion_are_announced_once_each() {
    let mut h = Harness::new(&with(ANNOUNCEMENTS));
    start(&mut h);
    settle(&mut h);
    h.advance(48 * HOUR);
    h.send(
        EventKind::Tick,
        Trigger::new(TriggerSource::Schedule, "t", ""),
    )
    .unwrap();
    settle(&mut h);
    let mut moments = Vec::new();
    for _ in 0..10 {
        if h.rollout.status == RolloutStatus::Completed {
            break;
        }
        h.advance(Duration::from_secs(86_400));
        h.observe(healthy());
        moments.extend(messages(&h.rollout).into_iter().map(|(_, m)| m.moment));
        settle(&mut h);
        if h.rollout.status == RolloutStatus::WaitingApproval {
            h.approve("notify", "bob").unwrap();
            moments.extend(messages(&h.rollout).into_iter().map(|(_, m)| m.moment));
            settle(&mut h);
        }
    }
    assert_eq!(h.rollout.status, RolloutStatus::Completed);
    let count = |m: plan::Moment| moments.iter().filter(|&&x| x == m).count();
    assert_eq!(count(plan::Moment::Approval), 1, "{moments:?}");
    assert_eq!(count(plan::Moment::Completed), 1, "{moments:?}");
    assert_eq!(
        count(plan::Moment::Phase),
        2,
        "notify and enforce start: {moments:?}"
    );
    assert_eq!(count(plan::Moment::Start), 0);
}

#[test]
fn a_plan_without_announcements_starts_at_once_and_says_nothing() {
    let mut h = Harness::new(PLAN);
    let t = start(&mut h);
    assert!(h.rollout.notice_until.is_none());
    assert!(t.effects.iter().all(|e| !e.effect.is_announcement()));
    assert_eq!(h.state("pilot"), PhaseState::Applying);
}

#[test]
fn announcement_mistakes_are_reported_at_their_places() {
    let text = with(
        r#"
[[announcement]]
channel = "email"
on = ["start", "lunch"]
groups = ["Nobody"]
addresses = ["not-an-address"]
subject = "{plan}\nsecond line"
template = "{plan} {nope}"
smtp_host = "smtp.contoso.com"
from = "pg@contoso.com"

[[announcement]]
channel = "slack"
on = ["completed"]
notice = "1d"
template = "x"
url = "https://hooks.slack.com/services/T/B/S"
"#,
    );
    let errors = plan::parse("p.toml", &text).unwrap_err();
    let messages: Vec<&str> = errors
        .diagnostics
        .iter()
        .map(|d| d.message.as_str())
        .collect();
    for expected in [
        "unknown moment `lunch`",
        "`Nobody` is not a group this plan names",
        "`not-an-address` is not an e-mail address",
        "a `subject` is one line",
        "unknown placeholder `{nope}`",
        "add \"start\" to `on`",
    ] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "{expected}: {messages:?}"
        );
    }
    let long = with(
        "[[announcement]]\nchannel = \"slack\"\nnotice = \"31d\"\ntemplate = \"x\"\nurl = \"https://h.example/x\"\n",
    );
    let errors = plan::parse("p.toml", &long).unwrap_err();
    assert!(
        errors.diagnostics[0]
            .message
            .contains("`notice` must be from"),
        "{errors:?}"
    );
}

#[test]
fn the_recipients_of_an_email_to_groups_are_fixed_once_and_a_dropped_one_leaves_the_outbox() {
    use crate::domain::directory::Recipients;
    let mut h = Harness::new(&with(ANNOUNCEMENTS));
    start(&mut h);
    let email = h
        .rollout
        .pending
        .iter()
        .find(|p| matches!(&p.effect, Effect::Notify { to, .. } if to.kind() == "email"))
        .unwrap()
        .id;
    let fixed = |h: &Harness| {
        messages(&h.rollout)
            .into_iter()
            .find(|(c, _)| c == "email")
            .and_then(|(_, m)| m.recipients)
    };
    assert_eq!(fixed(&h), None);
    let first = Recipients {
        addresses: vec!["ann@contoso.com".into()],
        without_mail: vec!["kiosk@contoso.com".into()],
        disabled: vec!["left@contoso.com".into()],
    };
    let trigger = || Trigger::new(TriggerSource::Provider, "simulator", "members read");
    h.send(
        EventKind::RecipientsResolved {
            effect: email,
            recipients: first.clone(),
        },
        trigger(),
    )
    .unwrap();
    assert_eq!(fixed(&h), Some(first.clone()));
    // A second reading (a crash between reading and recording, say) changes nothing.
    h.send(
        EventKind::RecipientsResolved {
            effect: email,
            recipients: Recipients::default(),
        },
        trigger(),
    )
    .unwrap();
    assert_eq!(fixed(&h), Some(first));
    h.send(
        EventKind::NotificationDropped {
            effect: email,
            reason: "too many".into(),
        },
        trigger(),
    )
    .unwrap();
    assert!(h.rollout.pending.iter().all(|p| p.id != email));
}
