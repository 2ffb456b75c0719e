//! Directory approver groups in the machine: an approval is judged against the rollout's latest
//! snapshot of the group, which the shell read earlier; the machine never asks the directory.

use std::collections::BTreeMap;

use super::tests::{Harness, PLAN, healthy};
use super::*;
use crate::domain::directory::{ApproverSnapshot, Member};

fn plan() -> String {
    PLAN.replacen(
        "[[phase]]",
        "[directory_approvers]\nboard = \"Change Advisory Board\"\n\n[[phase]]",
        1,
    )
    .replacen(
        "approvals = 1\n",
        "approvals = 1\napprover_groups = [\"board\"]\n",
        1,
    )
}

/// A rollout whose `notify` phase soaks and asks the board for approval.
fn soaking_notify() -> Harness {
    let mut h = Harness::new(&plan());
    h.start();
    h.soak_and_observe(healthy());
    assert_eq!(h.state("notify"), PhaseState::Soaking);
    h
}

fn read(h: &mut Harness, snapshot: ApproverSnapshot) -> Transition {
    let groups = BTreeMap::from([("board".to_string(), snapshot)]);
    h.send(
        EventKind::ApproversRead { groups },
        Trigger::new(TriggerSource::Provider, "graph contoso", "read"),
    )
    .unwrap()
}

fn board(h: &Harness, members: &[(&str, Option<&str>)]) -> ApproverSnapshot {
    let found: Vec<Member> = members
        .iter()
        .map(|(name, mail)| Member {
            id: format!("id-{name}"),
            name: name.to_string(),
            mail: mail.map(str::to_string),
            enabled: true,
        })
        .collect();
    ApproverSnapshot::read("Change Advisory Board", "graph contoso", h.now, &found)
}

fn refusal(h: &mut Harness, who: &str) -> String {
    match h.approve("notify", who) {
        Err(Rejection::Invalid(message)) => message,
        other => panic!("{who}'s approval was not refused: {other:?}"),
    }
}

#[test]
fn the_group_is_due_to_be_read_until_it_is_and_again_after_each_observation() {
    let mut h = soaking_notify();
    assert_eq!(approvers_due(&h.plan, &h.rollout), ["board"]);
    let snapshot = board(&h, &[("carol@contoso.com", None)]);
    read(&mut h, snapshot);
    assert!(approvers_due(&h.plan, &h.rollout).is_empty());
    h.advance(std::time::Duration::from_secs(6 * 3600));
    h.observe(healthy());
    assert_eq!(approvers_due(&h.plan, &h.rollout), ["board"]);
    // A reading whose clock is behind the observation's still settles it: no reading again
    // until a newer observation.
    let behind = ApproverSnapshot::read(
        "Change Advisory Board",
        "graph contoso",
        Timestamp::from_millis(0),
        &[],
    );
    read(&mut h, behind);
    assert!(approvers_due(&h.plan, &h.rollout).is_empty());
}

#[test]
fn a_member_of_the_latest_snapshot_may_approve_and_the_audit_note_says_where_from() {
    let mut h = soaking_notify();
    let snapshot = board(
        &h,
        &[
            ("carol@contoso.com", Some("Carol.Jones@contoso.com")),
            ("dan@contoso.com", None),
        ],
    );
    read(&mut h, snapshot);
    h.advance(std::time::Duration::from_secs(7200));
    // By mail address, whatever the case.
    let t = h.approve("notify", " carol.jones@CONTOSO.com").unwrap();
    let note = t.notes.join("\n");
    assert!(
        note.contains(
            "a member of group board, `Change Advisory Board` as read 2h ago from graph contoso"
        ),
        "{note}"
    );
    assert_eq!(h.rollout.phase("notify").unwrap().approvals.len(), 1);
}

#[test]
fn a_non_member_is_refused_saying_which_snapshot_judged() {
    let mut h = soaking_notify();
    let snapshot = board(&h, &[("carol@contoso.com", None)]);
    read(&mut h, snapshot);
    let message = refusal(&mut h, "mallory@contoso.com");
    assert!(
        message.contains("mallory@contoso.com may not approve phase `notify`"),
        "{message}"
    );
    assert!(
        message.contains(
            "directory group board, `Change Advisory Board` as read 0s ago from graph contoso"
        ),
        "{message}"
    );
    assert!(message.contains("is not among its members"), "{message}");
}

#[test]
fn nobody_may_approve_from_a_group_not_read_yet_empty_or_unreadable() {
    let mut h = soaking_notify();
    let message = refusal(&mut h, "carol@contoso.com");
    assert!(
        message.contains("have not been read from the directory yet"),
        "{message}"
    );
    let empty = board(&h, &[]);
    read(&mut h, empty);
    assert!(refusal(&mut h, "carol@contoso.com").contains("has no members"));
    let snapshot = board(&h, &[("carol@contoso.com", None)]);
    read(&mut h, snapshot);
    let unreadable = ApproverSnapshot::unreadable(
        "Change Advisory Board",
        "graph contoso",
        h.now,
        "403 Authorization_RequestDenied",
    );
    read(&mut h, unreadable);
    // The latest word counts: a member before, refused while the directory cannot be read.
    let message = refusal(&mut h, "carol@contoso.com");
    assert!(
        message.contains("could not be read (403 Authorization_RequestDenied)"),
        "{message}"
    );
}

#[test]
fn a_group_too_large_to_approve_from_is_recorded_as_unreadable() {
    let h = soaking_notify();
    let found: Vec<Member> = (0..=crate::domain::directory::APPROVER_MEMBERS_MAX)
        .map(|i| Member {
            id: i.to_string(),
            name: format!("u{i}@contoso.com"),
            mail: None,
            enabled: true,
        })
        .collect();
    let snapshot = ApproverSnapshot::read("Everyone", "graph", h.now, &found);
    assert!(snapshot.error.unwrap().contains("more than 1000 members"));
}
