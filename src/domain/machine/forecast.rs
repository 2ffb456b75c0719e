//! Impact forecasts in the machine: the forecast a promotion is decided on is recorded with it
//! and kept by the phase it starts, and once that phase has soaked it is checked against what
//! happened.

use super::Machine;
use crate::domain::forecast::{self, ImpactRecord};

/// `idx` was just promoted: the forecasts of its deciding observation go into the event.
pub(super) fn promoted(machine: &mut Machine<'_>, idx: usize) {
    let Some(observation) = &machine.next.phases[idx].observation else {
        return;
    };
    for forecast in &observation.forecasts {
        machine.notes.push(forecast.summary());
        machine
            .impact
            .push(ImpactRecord::Forecast(forecast.clone()));
    }
}

/// `idx` was just started: it keeps the forecast its start was decided on, if this step made
/// one.
pub(super) fn attach(machine: &mut Machine<'_>, idx: usize) {
    let id = &machine.plan.phases[idx].id;
    let forecast = machine.impact.iter().rev().find_map(|r| match r {
        ImpactRecord::Forecast(f) if &f.phase == id => Some(f.clone()),
        _ => None,
    });
    machine.next.phases[idx].forecast = forecast;
}

/// `idx` has soaked and its gate is judged on a fresh observation: the first time, its forecast
/// is checked against the outcome.
pub(super) fn soaked(machine: &mut Machine<'_>, idx: usize) {
    let record = &mut machine.next.phases[idx];
    let (Some(forecast), None, Some(observation)) = (
        &record.forecast,
        &record.forecast_check,
        &record.observation,
    ) else {
        return;
    };
    let Some(impact) = &observation.impact else {
        return;
    };
    let check = forecast::check(forecast, impact, observation.at);
    machine.notes.push(check.summary());
    record.forecast_check = Some(check.clone());
    machine.impact.push(ImpactRecord::Check(check));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{Harness, PLAN, healthy};
    use crate::domain::event::{EventKind, Trigger, TriggerSource};
    use crate::domain::forecast::{Affected, Forecast, Impact, ImpactRecord};
    use crate::domain::gate::Tally;
    use crate::domain::plan::Mode;
    use crate::domain::rollout::{PhaseObservation, PhaseState};

    const DAY: Duration = Duration::from_secs(86_400);

    fn forecast_for(h: &Harness, after: &str, next: &str, told: u64) -> Forecast {
        let phase = &h.plan.phases[h.plan.phase_index(next).unwrap()];
        Forecast {
            phase: next.into(),
            after: after.into(),
            mode: phase.mode,
            at: h.now,
            devices: 100,
            unknown: 0,
            before: Impact {
                reporting: 100,
                ..Impact::default()
            },
            notified: Affected {
                devices: told,
                users: told,
                ..Affected::default()
            },
            blocked: Affected::default(),
            blocked_at_once: 0,
            first_block: None,
        }
    }

    /// Observes every watched phase with `tally`, the impact `told`, and a forecast for each
    /// phase after it of `forecast` devices told.
    fn observe(
        h: &mut Harness,
        tally: Tally,
        told: u64,
        forecast: u64,
    ) -> crate::domain::machine::Transition {
        let observations = h
            .rollout
            .phases
            .iter()
            .filter(|p| matches!(p.state, PhaseState::Soaking | PhaseState::AwaitingApproval))
            .map(|p| {
                let idx = h.plan.phase_index(&p.id).unwrap();
                let forecasts = (0..h.plan.phases.len())
                    .filter(|&n| h.plan.phases[n].after.contains(&idx))
                    .map(|n| forecast_for(h, &p.id, &h.plan.phases[n].id, forecast))
                    .collect();
                PhaseObservation {
                    phase: p.id.clone(),
                    at: h.now,
                    tally,
                    by_platform: Vec::new(),
                    impact: Some(Impact {
                        notified_devices: told,
                        notified_users: told,
                        reporting: 100,
                        ..Impact::default()
                    }),
                    forecasts,
                    signins: None,
                    userless: 0,
                }
            })
            .collect();
        h.send(
            EventKind::Observed { observations },
            Trigger::new(TriggerSource::Schedule, "test", "observation due"),
        )
        .unwrap()
    }

    #[test]
    fn a_promotion_records_its_forecast_and_the_started_phase_keeps_it() {
        let mut h = Harness::new(PLAN);
        h.start();
        h.advance(DAY);
        let t = observe(&mut h, healthy(), 0, 9);
        assert_eq!(h.state("pilot"), PhaseState::Promoted);
        let [ImpactRecord::Forecast(f)] = t.impact.as_slice() else {
            panic!("{:?}", t.impact)
        };
        assert_eq!(
            (f.phase.as_str(), f.after.as_str(), f.mode),
            ("notify", "pilot", Mode::Notify)
        );
        assert!(
            t.notes.iter().any(|n| n
                .starts_with("forecast for `notify` (notify): 9 devices (9 users) newly notified")),
            "{:?}",
            t.notes
        );
        assert_eq!(
            h.rollout.phase("notify").unwrap().forecast.as_ref(),
            Some(f)
        );
    }

    #[test]
    fn once_the_started_phase_has_soaked_its_forecast_is_checked_once() {
        let mut h = Harness::new(PLAN);
        h.start();
        h.advance(DAY);
        observe(&mut h, healthy(), 0, 9);
        h.settle();
        // Still soaking: no check yet.
        h.advance(DAY / 2);
        let t = observe(&mut h, healthy(), 5, 0);
        assert!(t.impact.is_empty(), "{:?}", t.impact);
        assert!(h.rollout.phase("notify").unwrap().forecast_check.is_none());
        // Soaked: 8 told of 9 forecast, an error of 1 in 100 reporting devices.
        h.advance(DAY / 2);
        let t = observe(&mut h, healthy(), 8, 0);
        let [ImpactRecord::Check(c)] = t.impact.as_slice() else {
            panic!("{:?}", t.impact)
        };
        assert_eq!(
            (c.notified.forecast_devices, c.notified.actual_devices),
            (9, 8)
        );
        assert!((c.error() - 0.01).abs() < 1e-12);
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("forecast for `notify` against the outcome")),
            "{:?}",
            t.notes
        );
        assert_eq!(h.state("notify"), PhaseState::AwaitingApproval);
        let t = observe(&mut h, healthy(), 8, 0);
        assert!(t.impact.is_empty(), "checked once: {:?}", t.impact);
        assert!(h.rollout.phase("notify").unwrap().forecast_check.is_some());
    }

    #[test]
    fn a_phase_started_again_forgets_the_old_forecast() {
        let mut h = Harness::new(PLAN);
        h.start();
        h.advance(DAY);
        observe(&mut h, healthy(), 0, 9);
        h.settle();
        h.user(EventKind::RollbackRequested { to: None }, "bob")
            .unwrap();
        h.settle();
        assert!(h.rollout.phase("notify").unwrap().forecast.is_none());
    }

    #[test]
    fn an_approval_is_bound_to_the_forecast_shown_with_the_counts() {
        let mut h = Harness::new(PLAN);
        h.start();
        h.advance(DAY);
        observe(&mut h, healthy(), 0, 9);
        h.settle();
        h.advance(DAY);
        observe(&mut h, healthy(), 9, 4);
        h.approve("notify", "bob").unwrap();
        let approval = &h.rollout.phase("notify").unwrap().approvals[0];
        let evidence = approval.evidence.as_ref().unwrap();
        assert_eq!(evidence.forecasts.len(), 1);
        assert_eq!(evidence.forecasts[0].phase, "enforce");
        let without =
            super::super::approval::evidence_digest(&h.plan.hash, "notify", &healthy(), &[]);
        let with = super::super::approval::evidence_digest(
            &h.plan.hash,
            "notify",
            &healthy(),
            &evidence.forecasts,
        );
        assert_eq!(evidence.digest, with);
        assert_ne!(with, without, "the forecast is part of what was shown");
    }
}
