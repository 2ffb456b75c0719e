use super::*;

const WINDOWS: &str = include_str!("../../../plans/windows-baseline.toml");
const IOS: &str = include_str!("../../../plans/ios-parallel-pilots.toml");
const ANDROID: &str = include_str!("../../../plans/android-guarded.toml");
const MULTI: &str = include_str!("../../../plans/multi-platform-graph.toml");
const WINDOWS_GRAPH: &str = include_str!("../../../plans/windows-baseline-graph.toml");

const HEADER: &str = r#"
[rollout]
name = "t"

[policy]
compliance = "Baseline"
platform = "windows"

[provider]
kind = "simulator"
"#;

fn checked(body: &str) -> Result<Plan, PlanErrors> {
    parse("plan.toml", &format!("{HEADER}{body}"))
}

fn headlines(body: &str) -> Vec<String> {
    checked(body)
        .expect_err("plan should be invalid")
        .headlines()
}

/// The warnings of a valid plan, as `plan check` shows them.
fn warnings(body: &str) -> Vec<String> {
    let source = format!("{HEADER}{body}");
    let plan = parse("plan.toml", &source).unwrap_or_else(|e| panic!("{e}"));
    plan.warnings_in("plan.toml", &source).headlines()
}

#[test]
fn example_plans_are_valid() {
    for (name, text) in [("windows", WINDOWS), ("ios", IOS), ("android", ANDROID)] {
        let plan = parse(name, text).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        assert!(plan.phases.len() >= 4, "{name}");
    }
}

#[test]
fn example_plans_have_no_warnings() {
    for (name, text) in [
        ("windows", WINDOWS),
        ("ios", IOS),
        ("android", ANDROID),
        ("multi", MULTI),
        ("windows-graph", WINDOWS_GRAPH),
    ] {
        let plan = check(name, text, Strictness::Strict).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        assert!(plan.warnings.is_empty(), "{name}: {:?}", plan.warnings);
    }
}

#[test]
fn default_after_is_the_phase_before() {
    let plan = parse("w", WINDOWS).unwrap();
    let afters: Vec<Vec<usize>> = plan.phases.iter().map(|p| p.after.clone()).collect();
    assert_eq!(afters, vec![vec![], vec![0], vec![1], vec![2]]);
    assert_eq!(plan.order, vec![0, 1, 2, 3]);
}

#[test]
fn parallel_pilots_join_before_report_only() {
    let plan = parse("ios", IOS).unwrap();
    assert!(plan.phases[1].after.is_empty());
    assert_eq!(plan.phases[2].after, vec![0, 1]);
    assert_eq!(plan.ancestors(4), BTreeSet::from([0, 1, 2, 3]));
}

#[test]
fn unknown_keys_are_rejected_with_their_position() {
    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "report"
include = ["All Users"]
min_soke = "2d"
"#,
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("plan.toml:16:1: unknown field `min_soke`"),
        "{errors:?}"
    );
}

#[test]
fn every_problem_is_reported_at_once_with_line_and_column() {
    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "enforce"
include = []
min_soak = "2 fortnights"

[[phase]]
id = "b"
mode = "report"
include = ["All Users"]
after = ["a", "zzz"]

[[phase]]
id = "b"
mode = "enforce"
include = ["All Users"]

[phase.gate]
max_noncompliant_ratio = "120%"
"#,
    );
    let joined = errors.join("\n");
    assert!(joined.contains("plan.toml:15:11: empty scope"), "{joined}");
    assert!(
        joined.contains("plan.toml:16:12: invalid duration `2 fortnights`"),
        "{joined}"
    );
    assert!(
        joined.contains("plan.toml:22:15: unknown phase `zzz`"),
        "{joined}"
    );
    assert!(
        joined.contains("plan.toml:25:6: duplicate phase id `b`; it is first defined on line 19"),
        "{joined}"
    );
    assert!(
        joined.contains("plan.toml:30:26: invalid percentage `120%`"),
        "{joined}"
    );
    for line in &errors {
        let mut parts = line.splitn(4, ':');
        assert_eq!(parts.next(), Some("plan.toml"));
        assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
        assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
    }
}

#[test]
fn cycles_are_named_and_phases_behind_them_are_unreachable() {
    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "report"
include = ["All Users"]
after = ["c"]

[[phase]]
id = "b"
mode = "report"
include = ["All Users"]

[[phase]]
id = "c"
mode = "report"
include = ["All Users"]

[[phase]]
id = "d"
mode = "report"
include = ["All Users"]
"#,
    );
    let joined = errors.join("\n");
    assert!(
        joined.contains("the phases form a cycle: a → b → c → a"),
        "{joined}"
    );
    assert!(
        joined.contains("phase `d` is unreachable: it waits on `c`"),
        "{joined}"
    );
}

#[test]
fn a_phase_after_itself_is_a_cycle() {
    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "report"
include = ["All Users"]
after = ["a"]
"#,
    );
    assert!(errors[0].contains("cycle: a → a"), "{errors:?}");
}

#[test]
fn a_mode_must_not_weaken_along_an_edge() {
    let errors = headlines(
        r#"
[[phase]]
id = "enforce-first"
mode = "enforce"
include = ["Pilot IT"]
exclude = ["Break Glass"]

[[phase]]
id = "report-later"
mode = "report"
include = ["All Users"]

[emergency_access]
groups = ["Break Glass"]
"#,
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("plan.toml:20:8: mode weakens along an edge"),
        "{errors:?}"
    );
}

#[test]
fn notify_phases_need_grace_and_others_must_not_have_it() {
    let errors = headlines(
        r#"
[[phase]]
id = "r"
mode = "report"
include = ["All Users"]
grace = "3d"

[[phase]]
id = "n"
mode = "notify"
include = ["All Users"]
"#,
    );
    let joined = errors.join("\n");
    assert!(
        joined.contains("`grace` only applies to notify phases"),
        "{joined}"
    );
    assert!(
        joined.contains("a notify phase needs a `grace` period"),
        "{joined}"
    );
}

#[test]
fn wrong_types_and_enum_values_name_what_was_expected() {
    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "block"
include = ["All Users"]
"#,
    );
    assert!(errors[0].contains("plan.toml:14:8"), "{errors:?}");
    assert!(
        errors[0].contains("report") && errors[0].contains("enforce"),
        "{errors:?}"
    );
}

#[test]
fn an_excluded_group_may_not_also_be_included() {
    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "report"
include = ["All Users"]
exclude = ["All Users"]
"#,
    );
    assert!(
        errors[0].contains("is both included and excluded"),
        "{errors:?}"
    );
}

#[test]
fn a_plan_without_phases_is_invalid() {
    let errors = headlines("");
    assert!(
        errors[0].contains("a plan needs at least one [[phase]]"),
        "{errors:?}"
    );
}

#[test]
fn syntax_errors_have_a_position() {
    let errors = parse("x.toml", "[rollout\nname = 1")
        .unwrap_err()
        .headlines();
    assert!(errors[0].starts_with("x.toml:1:"), "{errors:?}");
}

#[test]
fn percentages_parse_and_print() {
    assert_eq!(Ratio::parse_percent("2%").unwrap().fraction(), 0.02);
    assert_eq!(Ratio::parse_percent(" 0.5 % ").unwrap().fraction(), 0.005);
    assert!(Ratio::parse_percent("2").is_none());
    assert!(Ratio::parse_percent("-1%").is_none());
    assert_eq!(format_percent(0.0234), "2.34%");
    assert_eq!(format_percent(0.02), "2%");
}

#[test]
fn the_hash_changes_with_the_text() {
    let a = parse("w", WINDOWS).unwrap();
    let b = parse(
        "w",
        &WINDOWS.replace("min_soak = \"2d\"", "min_soak = \"3d\""),
    )
    .unwrap();
    assert_ne!(a.hash, b.hash);
    assert_eq!(a.hash.len(), 64);
}

#[test]
fn several_compliance_policies_roll_out_together_one_per_platform() {
    let plan = parse("multi", MULTI).unwrap();
    assert_eq!(
        plan.policy.platforms(),
        vec![Platform::Windows, Platform::Ios, Platform::Android]
    );
    assert_eq!(plan.policy.compliance[1].name, "iOS compliance baseline");
    let two_for_windows = MULTI.replace("platform = \"ios\"", "platform = \"windows\"");
    let errors = parse("multi", &two_for_windows).unwrap_err().headlines();
    assert!(
        errors[0].contains("two compliance policies for windows"),
        "{errors:?}"
    );
    let with_platform = MULTI.replace(
        "conditional_access = ",
        "platform = \"windows\"\nconditional_access = ",
    );
    let errors = parse("multi", &with_platform).unwrap_err().headlines();
    assert!(
        errors[0].contains("each names its own `platform`"),
        "{errors:?}"
    );
}

#[test]
fn one_policy_needs_its_platform() {
    let text = HEADER.replace("platform = \"windows\"\n", "");
    let errors = parse(
        "plan.toml",
        &format!("{text}\n[[phase]]\nid = \"a\"\nmode = \"report\"\ninclude = [\"All Users\"]\n"),
    )
    .unwrap_err()
    .headlines();
    assert!(errors[0].contains("needs its `platform` too"), "{errors:?}");
}

#[test]
fn enforcing_needs_emergency_access_excluded_and_never_included() {
    let enforce = r#"
[[phase]]
id = "all"
mode = "enforce"
include = ["All Users"]
"#;
    let errors = headlines(enforce);
    assert!(
        errors[0].contains("must name its emergency-access accounts"),
        "{errors:?}"
    );
    let named = format!("{enforce}\n[emergency_access]\ngroups = [\"Break Glass\"]\n");
    let errors = headlines(&named);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("plan.toml:14:8: phase `all` enforces without excluding the emergency-access group `Break Glass`"),
        "{errors:?}"
    );
    let included = r#"
[[phase]]
id = "all"
mode = "report"
include = ["All Users", "Break Glass"]

[emergency_access]
groups = ["Break Glass"]
users = ["breakglass1@contoso.com"]
"#;
    let errors = headlines(included);
    assert!(
        errors[0].contains("includes the emergency-access group `Break Glass`"),
        "{errors:?}"
    );
    let empty = "\n[[phase]]\nid = \"a\"\nmode = \"report\"\ninclude = [\"All Users\"]\n\n[emergency_access]\n";
    assert!(headlines(empty)[0].contains("names no group and no user"));
    let plan = checked(
        "\n[[phase]]\nid = \"a\"\nmode = \"enforce\"\ninclude = [\"All Users\"]\nexclude = [\"Break Glass\"]\n\n[emergency_access]\ngroups = [\"Break Glass\"]\nusers = [\"bg1@contoso.com\"]\n",
    )
    .unwrap();
    assert_eq!(plan.emergency_access.users, vec!["bg1@contoso.com"]);
}

/// Every duration and count has a range, checked where it is written: no setting can overflow
/// time arithmetic, spin the engine, or silently vanish.
#[test]
fn durations_and_counts_outside_their_range_are_errors_at_their_place() {
    let phase = |extra: &str| {
        format!("[[phase]]\nid = \"p\"\nmode = \"report\"\ninclude = [\"G\"]\n{extra}\n")
    };
    for (extra, expected) in [
        (
            "min_soak = \"8000 years\"",
            "`min_soak` must be from 0s to 365d, found `8000 years`",
        ),
        (
            "min_soak = \"18446744073709551615s\"",
            "`min_soak` must be from 0s to 365d",
        ),
        (
            "[phase.gate]\nstale_after = \"0s\"",
            "`stale_after` must be from 1h to 120d",
        ),
        (
            "[phase.gate]\nmax_hold = \"400d\"",
            "`max_hold` must be from 0s to 365d",
        ),
        (
            "[phase.gate]\nmax_noncompliant = 100000001",
            "expected a whole number from 0 to 100000000",
        ),
        (
            "[phase.rollback_when]\nerrors_above = -1",
            "expected a whole number from 0 to 100000000",
        ),
        (
            "[phase.gate]\napprovals = 11",
            "expected a whole number from 0 to 10",
        ),
    ] {
        let lines = headlines(&phase(extra));
        assert!(
            lines.iter().any(|l| l.contains(expected)),
            "{extra}: {lines:?}"
        );
    }
    for every in ["1ns", "1s", "59s", "8d"] {
        let text = format!("{HEADER}{}", phase("")).replace(
            "name = \"t\"",
            &format!("name = \"t\"\nobserve_every = \"{every}\""),
        );
        let errors = parse("plan.toml", &text).expect_err(every).headlines();
        assert!(
            errors[0].contains("`observe_every` must be from 1m to 7d"),
            "{every}: {errors:?}"
        );
    }
}

#[test]
fn a_month_unit_is_refused_as_ambiguous_and_a_bare_number_gets_the_form_expected() {
    let phase = |extra: &str| {
        format!("[[phase]]\nid = \"p\"\nmode = \"report\"\ninclude = [\"G\"]\n{extra}\n")
    };
    for soak in ["1M", "2 months", "1month"] {
        let lines = headlines(&phase(&format!("min_soak = \"{soak}\"")));
        assert!(
            lines[0].contains("reads as months here but as minutes"),
            "{soak}: {lines:?}"
        );
    }
    let lines = headlines(&phase("[phase.gate]\nmax_noncompliant_ratio = 0.02"));
    assert!(lines[0].contains("such as \"2%\" for 0.02"), "{lines:?}");
    let lines = headlines(&phase("min_soak = 3"));
    assert!(lines[0].contains("a duration is a string"), "{lines:?}");
    assert!(checked(&phase("min_soak = \"30m\"")).is_ok());
}

#[test]
fn a_plan_has_a_bounded_number_of_phases_and_groups() {
    let many: String = (0..=MAX_PHASES)
        .map(|i| format!("[[phase]]\nid = \"p{i}\"\nmode = \"report\"\ninclude = [\"G\"]\n"))
        .collect();
    let lines = headlines(&many);
    assert!(
        lines[0].contains("at most 100 phases; this one has 101"),
        "{lines:?}"
    );
    let groups: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("\"G{i}\"")).collect();
    let lines = headlines(&format!(
        "[[phase]]\nid = \"p\"\nmode = \"report\"\ninclude = [{}]\n",
        groups.join(", ")
    ));
    assert!(
        lines[0].contains("includes at most 100 groups"),
        "{lines:?}"
    );
    let lines = headlines(&format!(
        "[[phase]]\nid = \"p\"\nmode = \"report\"\ninclude = [\"A\"]\nexclude = [{}]\n",
        groups.join(", ")
    ));
    assert!(
        lines[0].contains("excludes at most 100 groups"),
        "{lines:?}"
    );
    let fine: String = (0..MAX_PHASES)
        .map(|i| format!("[[phase]]\nid = \"p{i}\"\nmode = \"report\"\ninclude = [\"G\"]\n"))
        .collect();
    assert!(checked(&fine).is_ok());
}

/// A pilot, then `extra` phases; the emergency access every enforce phase needs.
fn staged(extra: &str) -> String {
    format!(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
exclude = ["Break Glass"]

[phase.gate]
min_reporting = "90%"
{extra}
[emergency_access]
groups = ["Break Glass"]
users = ["bg1@contoso.com"]
"#
    )
}

#[test]
fn enforcing_on_a_broad_scope_before_anything_was_observed_is_a_warning() {
    // Beside the pilot, from the start, on everyone.
    let lines = warnings(&staged(
        r#"
[[phase]]
id = "everyone"
mode = "enforce"
include = ["All Users"]
exclude = ["Break Glass"]
after = []

[phase.gate]
max_noncompliant_ratio = "2%"
"#,
    ));
    assert_eq!(
        lines,
        vec![
            "plan.toml:23:8: warning: phase `everyone` enforces on `All Users` from the start of \
             the rollout, with no report or notify phase before it"
        ]
    );
    // On a group the pilot stages, after enforce phases only.
    let lines = warnings(&staged(
        r#"
[[phase]]
id = "first"
mode = "enforce"
include = ["Sales"]
exclude = ["Break Glass"]
after = []

[phase.gate]
approvals = 1

[[phase]]
id = "it"
mode = "enforce"
include = ["pilot it"]
exclude = ["Break Glass"]

[phase.gate]
approvals = 1
"#,
    ));
    assert_eq!(
        lines,
        vec![
            "plan.toml:33:8: warning: phase `it` enforces on `pilot it`, which phase `pilot` also \
             includes, after enforce phases only, with no report or notify phase before it"
        ],
        "`first` enforces on a group nothing else stages: a deliberate enforcing pilot"
    );
    // After the pilot, nothing to say.
    let fine = staged(
        r#"
[[phase]]
id = "everyone"
mode = "enforce"
include = ["All Users"]
exclude = ["Break Glass"]

[phase.gate]
max_noncompliant_ratio = "2%"
"#,
    );
    assert_eq!(warnings(&fine), Vec::<String>::new());
}

#[test]
fn an_enforce_phase_whose_gate_has_no_criteria_is_a_warning() {
    let lines = warnings(&staged(
        r#"
[[phase]]
id = "enforce"
mode = "enforce"
include = ["All Users"]
exclude = ["Break Glass"]
"#,
    ));
    assert_eq!(
        lines,
        vec!["plan.toml:23:8: warning: enforce phase `enforce` has no gate"]
    );
    let lines = warnings(&staged(
        r#"
[[phase]]
id = "enforce"
mode = "enforce"
include = ["All Users"]
exclude = ["Break Glass"]

[phase.gate]
max_hold = "3d"
stale_after = "2d"
"#,
    ));
    assert_eq!(
        lines,
        vec!["plan.toml:27:1: warning: the gate of enforce phase `enforce` has no criteria"]
    );
    // Approvals are a criterion: a person decides.
    let fine = staged(
        "\n[[phase]]\nid = \"enforce\"\nmode = \"enforce\"\ninclude = [\"All Users\"]\nexclude = [\"Break Glass\"]\n\n[phase.gate]\napprovals = 1\n",
    );
    assert_eq!(warnings(&fine), Vec::<String>::new());
}

#[test]
fn gate_criteria_that_cannot_do_their_job_are_warnings() {
    let lines = warnings(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]

[phase.gate]
min_reporting = "0%"
max_noncompliant_ratio = "100%"
max_error_ratio = "100.0%"

[phase.rollback_when]
noncompliant_ratio_above = "100%"
blocked_ratio_above = "99.9%"
"#,
    );
    assert_eq!(
        lines,
        vec![
            "plan.toml:18:17: warning: `min_reporting = \"0%\"` in phase `pilot` asks for no coverage",
            "plan.toml:19:26: warning: `max_noncompliant_ratio = \"100%\"` in the gate of phase `pilot` cannot fail",
            "plan.toml:20:19: warning: `max_error_ratio = \"100.0%\"` in the gate of phase `pilot` cannot fail",
            "plan.toml:23:28: warning: `noncompliant_ratio_above = \"100%\"` in the rollback_when of phase `pilot` can never trip",
        ]
    );
}

#[test]
fn no_soak_before_another_phase_is_a_warning() {
    let lines = warnings(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
min_soak = "0s"

[[phase]]
id = "everyone"
mode = "report"
include = ["All Users"]
min_soak = "0s"
"#,
    );
    assert_eq!(
        lines,
        vec![
            "plan.toml:16:12: warning: phase `pilot` has no soak (`min_soak = \"0s\"`) before \
             `everyone` starts"
        ],
        "the last phase has no successor to start early"
    );
}

#[test]
fn an_emergency_access_user_in_a_scope_is_a_warning_and_a_group_stays_an_error() {
    let lines = warnings(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT", "BG1@contoso.com"]

[emergency_access]
groups = ["Break Glass"]
users = ["bg1@contoso.com"]
"#,
    );
    assert_eq!(
        lines,
        vec![
            "plan.toml:15:24: warning: phase `pilot` includes `BG1@contoso.com`, an \
             emergency-access user"
        ]
    );
    let errors = headlines(
        "\n[[phase]]\nid = \"pilot\"\nmode = \"report\"\ninclude = [\"Break Glass\"]\n\n[emergency_access]\ngroups = [\"Break Glass\"]\n",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("includes the emergency-access group"),
        "{errors:?}"
    );
}

#[test]
fn every_warning_says_why_and_renders_with_its_line() {
    let source = format!(
        "{HEADER}{}",
        staged(
            "\n[[phase]]\nid = \"all\"\nmode = \"enforce\"\ninclude = [\"All Users\"]\nexclude = [\"Break Glass\"]\nafter = []\n"
        )
    );
    let plan = parse("plan.toml", &source).unwrap();
    assert_eq!(plan.warnings.len(), 2, "{:?}", plan.warnings);
    assert!(plan.warnings.iter().all(|w| w.why.is_some()));
    let shown = plan.warnings_in("plan.toml", &source).to_string();
    assert!(
        shown.starts_with("plan.toml:23:8: warning: phase `all` enforces on `All Users`"),
        "{shown}"
    );
    assert!(shown.contains("23 | mode = \"enforce\"\n"), "{shown}");
    assert!(shown.contains("   |        ^^^^^^^^^\n"), "{shown}");
    assert!(
        shown.contains("   = why: devices are blocked before anyone has seen"),
        "{shown}"
    );
}

#[test]
fn strict_makes_warnings_errors_from_the_caller_or_the_plan() {
    let body = staged(
        "\n[[phase]]\nid = \"all\"\nmode = \"enforce\"\ninclude = [\"All Users\"]\nexclude = [\"Break Glass\"]\n\n[phase.gate]\nmax_noncompliant_ratio = \"100%\"\n",
    );
    let source = format!("{HEADER}{body}");
    assert_eq!(parse("plan.toml", &source).unwrap().warnings.len(), 1);
    let errors = check("plan.toml", &source, Strictness::Strict).unwrap_err();
    assert_eq!(
        errors.headlines(),
        vec![
            "plan.toml:28:26: `max_noncompliant_ratio = \"100%\"` in the gate of phase `all` cannot fail"
        ]
    );
    let why = errors.diagnostics[0].why.as_deref().unwrap();
    assert!(
        why.ends_with("; an error here: the plan is checked strictly"),
        "{why}"
    );

    let strict = source.replace("name = \"t\"", "name = \"t\"\nstrict = true");
    let errors = parse("plan.toml", &strict).unwrap_err();
    assert_eq!(errors.diagnostics.len(), 1, "{errors}");
    assert!(
        errors.headlines()[0].starts_with("plan.toml:29:26: "),
        "{errors}"
    );
    assert!(
        errors
            .to_string()
            .contains("an error here: the plan sets `strict = true`"),
        "{errors}"
    );
    // A plan read back from the store was accepted when its rollout started.
    let stored = check("plan.toml", &strict, Strictness::Lenient).unwrap();
    assert_eq!(stored.warnings.len(), 1);
    // Without warnings, strict changes nothing.
    let clean = strict.replace("\"100%\"", "\"2%\"");
    let plan = check("plan.toml", &clean, Strictness::Strict).unwrap();
    assert!(plan.strict && plan.warnings.is_empty());
}

#[test]
fn every_structural_error_is_reported_in_one_run() {
    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "report"
include = ["All Users"]
min_soke = "2d"

[phase.gate]
max_noncompliant_ration = "2%"
approvals = "one"

[[phase]]
id = "b"
mode = "report"
include = ["All Users"]
exlude = ["Break Glass"]

[emergency_access]
group = ["Break Glass"]

[rollotu]
name = "x"
"#,
    );
    let expected = [
        "plan.toml:16:1: unknown field `min_soke`",
        "plan.toml:19:1: unknown field `max_noncompliant_ration`",
        "plan.toml:20:13: invalid type: string \"one\", expected i64",
        "plan.toml:26:1: unknown field `exlude`",
        "plan.toml:29:1: unknown field `group`",
        "plan.toml:31:2: unknown field `rollotu`",
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, expected) in errors.iter().zip(expected) {
        assert!(error.starts_with(expected), "{error} / {expected}");
    }
}

#[test]
fn a_type_error_and_an_unknown_key_in_different_tables_are_both_reported() {
    let text = HEADER.replace(
        "name = \"t\"",
        "name = \"t\"\nseparation_of_duties = \"yes\"",
    );
    let errors = parse(
        "plan.toml",
        &format!(
            "{text}\n[[phase]]\nid = \"a\"\nmode = \"block\"\ninclude = [\"All Users\"]\nmin_soke = \"2d\"\n"
        ),
    )
    .unwrap_err()
    .headlines();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].starts_with("plan.toml:4:24: invalid type: string \"yes\", expected a boolean"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("plan.toml:15:8: unknown variant `block`"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("plan.toml:17:1: unknown field `min_soke`"),
        "{errors:?}"
    );
}

#[test]
fn a_missing_table_is_reported_with_the_other_problems() {
    let text = HEADER.replace("[provider]\nkind = \"simulator\"\n", "");
    let errors = parse(
        "plan.toml",
        &format!("{text}\n[[phase]]\nid = \"a\"\nmode = \"report\"\ninclude = 7\n"),
    )
    .unwrap_err()
    .headlines();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].contains("missing field `provider`"), "{errors:?}");
    assert!(
        errors[1].contains("invalid type: integer `7`, expected"),
        "{errors:?}"
    );
}

/// A plan with a 10 MB line: what is shown of it stays small.
#[test]
fn a_ten_megabyte_line_prints_a_few_hundred_characters() {
    let long = "n".repeat(10 * 1024 * 1024);
    let text = HEADER.replace("name = \"t\"", &format!("name = \"{long}\""));
    let errors = parse(
        "plan.toml",
        &format!("{text}\n[[phase]]\nid = \"a\"\nmode = \"report\"\ninclude = [\"G\"]\n"),
    )
    .unwrap_err();
    let shown = errors.to_string();
    assert!(
        shown.len() < 1500,
        "{} bytes:\n{}",
        shown.len(),
        &shown[..2000.min(shown.len())]
    );
    assert!(
        shown.starts_with("plan.toml:3:8: invalid rollout name `nnn"),
        "{shown}"
    );
    assert!(shown.contains("3 | name = \"nnnn"), "{shown}");
    assert!(shown.contains("n…\n"), "{shown}");
}

/// A phase needing approval, with `gate` appended to its gate and `top` before the phases.
fn with_approval(top: &str, gate: &str) -> String {
    format!(
        r#"{top}
[[phase]]
id = "notify"
mode = "notify"
include = ["All Users"]
grace = "7d"
[phase.gate]
approvals = 2
{gate}
"#
    )
}

#[test]
fn an_approval_policy_names_people_and_groups_compared_ignoring_case() {
    let body = with_approval(
        r#"[approvers]
change-board = ["Alice@Contoso.com", "bob@contoso.com "]
"#,
        r#"approvers = ["Carol@contoso.com"]
approver_groups = ["change-board"]
approval_expires_after = "24h"
ticket_pattern = "CHG[0-9]{7}"
approval_tolerance = "0.5%"
"#,
    );
    let plan = checked(&body).unwrap_or_else(|e| panic!("{e}"));
    let policy = &plan.phases[0].approval;
    assert_eq!(
        policy.eligible.iter().collect::<Vec<_>>(),
        ["alice@contoso.com", "bob@contoso.com", "carol@contoso.com"]
    );
    assert_eq!(policy.groups, ["change-board"]);
    assert_eq!(policy.expires_after, Some(Duration::from_secs(24 * 3600)));
    let tolerance = policy.evidence_tolerance.unwrap().fraction();
    assert!((tolerance - 0.005).abs() < 1e-12, "{tolerance}");
    assert!(policy.allows("bob@contoso.com") && !policy.allows("mallory@contoso.com"));
    assert!(policy.ticket(Some("CHG0000042")).is_ok());
    assert!(policy.ticket(None).is_err());
    assert_eq!(
        plan.approver_groups["change-board"],
        ["alice@contoso.com", "bob@contoso.com"]
    );
    assert!(plan.separation_of_duties, "on unless the plan turns it off");
    // Without approvers named, anyone may approve: `approvals` alone is the quorum.
    let open = checked(&with_approval("", "")).unwrap();
    assert!(!open.phases[0].approval.names_approvers());
    assert!(open.phases[0].approval.allows("whoever"));
}

#[test]
fn approval_settings_are_checked_at_their_line_and_column() {
    let errors = headlines(&with_approval(
        r#"[approvers]
"change board" = ["alice"]
empty = []
twice = ["bob", "BOB"]
"#,
        r#"approvers = ["  "]
approver_groups = ["nobody"]
approval_expires_after = "90d"
ticket_pattern = "CHG("
approval_tolerance = "0.5"
"#,
    ));
    let joined = errors.join("\n");

    for expected in [
        "plan.toml:12:1: invalid approver group name `change board`",
        "plan.toml:13:9: approver group `empty` has nobody in it",
        "plan.toml:14:17: `BOB` is listed twice",
        "plan.toml:23:14: a person's name must not be empty",
        "plan.toml:24:20: unknown approver group `nobody`; `[approvers]` and `[directory_approvers]` define: change board, empty, twice",
        "plan.toml:25:26: `approval_expires_after` must be from 1m to 30d, found `90d`",
        "plan.toml:26:18: invalid `ticket_pattern`: unclosed group",
        "plan.toml:27:22: invalid percentage `0.5`",
    ] {
        assert!(joined.contains(expected), "{expected}\n{joined}");
    }
}

#[test]
fn a_quorum_needs_enough_people_and_approval_settings_need_a_quorum() {
    let errors = headlines(&with_approval("", "approvers = [\"alice\"]\n"));
    assert!(
        errors[0].starts_with(
            "plan.toml:18:13: phase `notify` needs 2 distinct approvers but only 1 person may approve it (alice)"
        ),
        "{errors:?}"
    );
    // The author may not approve under separation of duties, so they do not count.
    let authored = with_approval("", "approvers = [\"alice\", \"bob\"]\n");
    let source =
        format!("{HEADER}{authored}").replace("name = \"t\"", "name = \"t\"\nauthor = \"Alice\"");
    let errors = parse("plan.toml", &source).unwrap_err().headlines();
    assert!(
        errors[0].contains("only 1 person besides the plan's author alice may approve it"),
        "{errors:?}"
    );
    let relaxed = source.replace(
        "author = \"Alice\"",
        "author = \"Alice\"\nseparation_of_duties = false",
    );
    let plan = parse("plan.toml", &relaxed).unwrap_or_else(|e| panic!("{e}"));
    assert!(!plan.separation_of_duties);
    assert_eq!(plan.author.as_deref(), Some("alice"));

    let errors = headlines(
        r#"
[[phase]]
id = "a"
mode = "report"
include = ["All Users"]
[phase.gate]
require_ticket = true
"#,
    );
    assert!(
        errors[0].starts_with("plan.toml:17:18: phase `a` needs no approval (`approvals` is 0)"),
        "{errors:?}"
    );
}

#[test]
fn sign_in_criteria_parse_with_their_defaults_and_bounds() {
    let plan = checked(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
[phase.gate]
max_blocked_signins = 20
max_blocked_signin_ratio = "2%"
signin_window = "6h"
signin_data = "optional"
[phase.rollback_when]
blocked_signins_above = 50
blocked_signin_ratio_above = "10%"
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let phase = &plan.phases[0];
    assert_eq!(phase.gate.max_blocked_signins, Some(20));
    assert_eq!(
        phase.gate.max_blocked_signin_ratio.unwrap().to_string(),
        "2%"
    );
    assert_eq!(phase.gate.signin_window, Duration::from_secs(6 * 3600));
    assert_eq!(phase.gate.signin_data, SignInData::Optional);
    assert_eq!(phase.rollback_when.blocked_signins_above, Some(50));
    assert_eq!(
        phase
            .rollback_when
            .blocked_signin_ratio_above
            .unwrap()
            .to_string(),
        "10%"
    );
    let defaults = checked(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
"#,
    )
    .unwrap();
    assert_eq!(defaults.phases[0].gate.signin_window, DEFAULT_SIGNIN_WINDOW);
    assert_eq!(defaults.phases[0].gate.signin_data, SignInData::Required);
    let errors = headlines(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
[phase.gate]
max_blocked_signins = -1
max_blocked_signin_ratio = "120%"
signin_window = "30d"
signin_data = "maybe"
[phase.rollback_when]
blocked_signins_above = 100000001
"#,
    );
    assert_eq!(errors.len(), 5, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("expected a whole number from 0 to 100000000, found -1")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("invalid percentage `120%`")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`signin_window` must be from 10m to 7d")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("`signin_data` is \"required\" or \"optional\"")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("found 100000001")),
        "{errors:?}"
    );
    let stray = headlines(
        r#"
[[phase]]
id = "pilot"
mode = "report"
include = ["Pilot IT"]
[phase.gate]
signin_window = "6h"
"#,
    );
    assert_eq!(stray.len(), 1, "{stray:?}");
    assert!(
        stray[0].contains("`signin_window` only applies with a sign-in criterion"),
        "{stray:?}"
    );
}
