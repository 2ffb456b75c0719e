//! The simulator's `[provider]` settings: the size and seed of the simulated fleet and how fast
//! notified owners fix their devices. Parsed from the plan's text by this adapter alone.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::adapters::{self, ProviderKind};
use crate::domain::plan::{Diagnostic, DurationRange, ProviderConfig, duration_within};

pub const KIND: ProviderKind = ProviderKind {
    name: "simulator",
    check: |source| parse(source).err().unwrap_or_default(),
};

pub const DEFAULT_DEVICES: u32 = 10_000;
pub const DEFAULT_REMEDIATION_HALF_LIFE: Duration = Duration::from_secs(2 * 24 * 3600);
pub const MAX_DEVICES: i64 = 5_000_000;
pub const REMEDIATION_HALF_LIFE_RANGE: DurationRange = DurationRange {
    min: Duration::from_secs(60),
    max: Duration::from_secs(365 * 24 * 3600),
};

/// The built-in simulated fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatorSettings {
    pub devices: u32,
    pub seed: u64,
    /// Time in which half of the notified owners fix a noncompliant device.
    pub remediation_half_life: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[allow(dead_code)]
    kind: String,
    devices: Option<Spanned<i64>>,
    seed: Option<Spanned<i64>>,
    remediation_half_life: Option<Spanned<String>>,
}

/// The settings in a plan's text, or every problem with them at its place.
pub fn parse(source: &str) -> Result<SimulatorSettings, Vec<Diagnostic>> {
    let raw = adapters::provider_table::<Raw>(source)
        .map_err(|d| vec![adapters::foreign_key(d, "the simulator provider")])?
        .into_inner();
    let mut problems = Vec::new();
    let devices = match &raw.devices {
        None => Some(DEFAULT_DEVICES),
        Some(n) if (1..=MAX_DEVICES).contains(n.get_ref()) => Some(*n.get_ref() as u32),
        Some(n) => {
            problems.push(Diagnostic::new(
                n.span(),
                format!(
                    "a simulated fleet has from 1 to {MAX_DEVICES} devices, found {}",
                    n.get_ref()
                ),
            ));
            None
        }
    };
    let seed = match &raw.seed {
        None => Some(1),
        Some(n) if *n.get_ref() >= 0 => Some(*n.get_ref() as u64),
        Some(n) => {
            problems.push(Diagnostic::new(
                n.span(),
                format!(
                    "expected a whole number from 0 to {}, found {}",
                    i64::MAX,
                    n.get_ref()
                ),
            ));
            None
        }
    };
    let half_life = match &raw.remediation_half_life {
        None => Some(DEFAULT_REMEDIATION_HALF_LIFE),
        Some(text) => {
            match duration_within(text, "remediation_half_life", REMEDIATION_HALF_LIFE_RANGE) {
                Ok(d) => Some(d),
                Err(d) => {
                    problems.push(d);
                    None
                }
            }
        }
    };
    match (devices, seed, half_life) {
        (Some(devices), Some(seed), Some(remediation_half_life)) if problems.is_empty() => {
            Ok(SimulatorSettings {
                devices,
                seed,
                remediation_half_life,
            })
        }
        _ => Err(problems),
    }
}

/// The settings a checked plan carries.
pub fn of(config: &ProviderConfig) -> Result<SimulatorSettings, String> {
    adapters::reparse("simulator", &adapters::provider_source(config), parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(provider: &str) -> String {
        format!("[rollout]\nname = \"x\"\n\n[provider]\nkind = \"simulator\"\n{provider}\n")
    }

    #[test]
    fn defaults_and_given_values() {
        assert_eq!(
            parse(&plan("")).unwrap(),
            SimulatorSettings {
                devices: DEFAULT_DEVICES,
                seed: 1,
                remediation_half_life: DEFAULT_REMEDIATION_HALF_LIFE
            }
        );
        let given = parse(&plan(
            "devices = 50\nseed = 3\nremediation_half_life = \"1d\"",
        ))
        .unwrap();
        assert_eq!((given.devices, given.seed), (50, 3));
        assert_eq!(given.remediation_half_life, Duration::from_secs(86_400));
    }

    #[test]
    fn every_problem_at_its_place() {
        let source = plan("devices = 0\nseed = -1\nremediation_half_life = \"soon\"");
        let problems = parse(&source).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].message.contains("from 1 to 5000000"));
        assert_eq!(&source[problems[0].span.clone()], "0");
        assert!(problems[2].message.contains("invalid duration `soon`"));
    }

    #[test]
    fn a_graph_setting_is_not_one_of_the_simulator() {
        let source = plan("tenant = \"contoso\"");
        let problems = parse(&source).unwrap_err();
        assert!(
            problems[0]
                .message
                .contains("`tenant` is not a setting of the simulator provider"),
            "{problems:?}"
        );
        assert_eq!(&source[problems[0].span.clone()], "tenant");
    }

    #[test]
    fn settings_kept_in_a_plan_read_back_the_same() {
        let source = plan("devices = 70\nseed = 9");
        let config = crate::domain::plan::ProviderConfig {
            kind: "simulator".into(),
            settings: [
                ("devices".to_string(), serde_json::json!(70)),
                ("seed".to_string(), serde_json::json!(9)),
            ]
            .into_iter()
            .collect(),
        };
        assert_eq!(of(&config).unwrap(), parse(&source).unwrap());
    }
}
