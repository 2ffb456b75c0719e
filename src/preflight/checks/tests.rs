use super::*;

const DAY: Duration = Duration::from_secs(86_400);

fn plan(name: &str) -> Plan {
    let text =
        std::fs::read_to_string(format!("{}/plans/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    crate::adapters::parse_plan(name, &text).unwrap()
}

fn found(target: &str, ttl: u32) -> CnameAnswer {
    CnameAnswer::Found {
        target: target.into(),
        ttl,
    }
}

fn records(enrollment: CnameAnswer, registration: CnameAnswer) -> Vec<DomainRecords> {
    vec![DomainRecords {
        domain: "contoso.com".into(),
        enrollment,
        registration,
    }]
}

#[test]
fn right_records_are_ok_whichever_enrolment_target() {
    for target in [
        "EnterpriseEnrollment-s.manage.microsoft.com.",
        "enterpriseenrollment.manage.microsoft.com",
    ] {
        let findings = enrolment_dns(&records(
            found(target, 3600),
            found("EnterpriseRegistration.windows.net", 3600),
        ));
        assert_eq!(findings.len(), 2);
        assert!(
            findings.iter().all(|f| f.level == Level::Ok),
            "{findings:?}"
        );
    }
}

#[test]
fn a_wrong_target_names_record_expected_and_found() {
    let findings = enrolment_dns(&records(
        found("enrollment.example.net", 3600),
        found("EnterpriseRegistration.windows.net", 3600),
    ));
    let error = &findings[0];
    assert_eq!(error.level, Level::Error);
    assert!(error.message.contains("EnterpriseEnrollment.contoso.com"));
    assert!(error.message.contains("enrollment.example.net"));
    assert!(
        error
            .message
            .contains("EnterpriseEnrollment-s.manage.microsoft.com")
    );
    assert!(error.fix.as_deref().unwrap().contains("TTL 3600"));
    assert_eq!(findings[1].level, Level::Ok);
}

#[test]
fn a_missing_or_unanswered_record_is_an_error_and_another_ttl_a_warning() {
    let findings = enrolment_dns(&records(
        CnameAnswer::Missing,
        CnameAnswer::Failed("request timed out".into()),
    ));
    assert_eq!(findings[0].level, Level::Error);
    assert!(findings[0].message.contains("no CNAME found"));
    assert_eq!(findings[1].level, Level::Error);
    assert!(findings[1].message.contains("request timed out"));
    let findings = enrolment_dns(&records(
        found("EnterpriseEnrollment.manage.microsoft.com", 300),
        found("EnterpriseRegistration.windows.net", 86_400),
    ));
    assert!(findings.iter().all(|f| f.level == Level::Warning));
    assert!(findings[0].message.contains("TTL 300"));
}

#[test]
fn the_planned_length_follows_the_longest_chain_of_soaks() {
    // pilot-it (2d) and pilot-field run side by side; report-only waits for both.
    let plan = plan("ios-parallel-pilots.toml");
    let sequential: Duration = plan.phases.iter().map(|p| p.min_soak).sum();
    let length = planned_length(&plan);
    assert!(length < sequential, "{length:?} vs {sequential:?}");
    assert!(length > Duration::ZERO);
}

#[test]
fn a_certificate_expiring_before_the_rollout_ends_fails_it() {
    let now = Timestamp::from_millis(1_700_000_000_000);
    let expiry = |days: u64| {
        Ok(CertificateExpiry {
            source: "apns.pem".into(),
            expires: now.plus(DAY * days as u32),
        })
    };
    // Ten days left, a three-week rollout: an error.
    let finding = apns_certificate(&expiry(10), now, DAY * 21, DAY * 7);
    assert_eq!(finding.level, Level::Error);
    assert!(finding.message.contains("before the rollout's planned end"));
    // Long enough for the rollout and margin, but inside 30 days: a warning.
    let finding = apns_certificate(&expiry(25), now, DAY * 7, DAY * 7);
    assert_eq!(finding.level, Level::Warning);
    let finding = apns_certificate(&expiry(200), now, DAY * 21, DAY * 14);
    assert_eq!(finding.level, Level::Ok);
    let expired = Ok(CertificateExpiry {
        source: "tenant".into(),
        expires: now.minus(DAY),
    });
    let finding = apns_certificate(&expired, now, DAY, DAY);
    assert_eq!(finding.level, Level::Error);
    assert!(finding.message.contains("expired"));
    let missing = apns_certificate(&Err("no certificate".into()), now, DAY, DAY);
    assert_eq!(missing.level, Level::Error);
}

fn policy(actions: &[(&str, i64)], odata_type: &str) -> PolicyFacts {
    PolicyFacts {
        name: "iOS baseline".into(),
        platform: Platform::Ios,
        found: Lookup::Found(FoundPolicy {
            odata_type: odata_type.into(),
            actions: actions
                .iter()
                .map(|(t, h)| ScheduledAction {
                    action_type: t.to_string(),
                    grace_period_hours: *h,
                })
                .collect(),
        }),
    }
}

const IOS: &str = "#microsoft.graph.iosCompliancePolicy";

#[test]
fn a_wipe_in_the_schedule_is_refused_unless_the_plan_allows_it() {
    let wiping = [policy(&[("block", 0), ("wipe", 720)], IOS)];
    let findings = compliance_policies(&wiping, &[]);
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].level, Level::Error);
    assert!(findings[0].message.contains("`wipe`"));
    assert!(
        findings[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("allow_device_actions = [\"wipe\"]")
    );
    // Allowing retire does not allow wipe.
    let findings = compliance_policies(&wiping, &[DeviceAction::Retire]);
    assert_eq!(findings[0].level, Level::Error);
    let findings = compliance_policies(&wiping, &[DeviceAction::Wipe]);
    assert_eq!(findings[0].level, Level::Ok, "{findings:?}");
}

#[test]
fn a_policy_must_exist_be_of_the_platform_and_have_a_schedule() {
    let findings = compliance_policies(&[policy(&[("block", 0)], IOS)], &[]);
    assert_eq!(findings[0].level, Level::Ok);
    let findings = compliance_policies(
        &[policy(
            &[("block", 0)],
            "#microsoft.graph.windows10CompliancePolicy",
        )],
        &[],
    );
    assert_eq!(findings[0].level, Level::Error);
    assert!(findings[0].message.contains("windows10CompliancePolicy"));
    let findings = compliance_policies(&[policy(&[], IOS)], &[]);
    assert!(findings[0].message.contains("no actions"));
    let missing = PolicyFacts {
        found: Lookup::Missing,
        ..policy(&[], IOS)
    };
    assert!(
        compliance_policies(&[missing], &[])[0]
            .message
            .contains("not found")
    );
}

#[test]
fn the_template_needs_a_message_in_its_default_locale() {
    let template = |messages: Vec<(&str, bool, bool)>| {
        Lookup::Found(FoundTemplate {
            default_locale: Some("en-us".into()),
            messages: messages
                .into_iter()
                .map(|(l, d, f)| (l.to_string(), d, f))
                .collect(),
        })
    };
    let ok = notification_template("T", &template(vec![("en-US", true, true)]));
    assert_eq!(ok.level, Level::Ok);
    let other = notification_template("T", &template(vec![("de-de", false, true)]));
    assert_eq!(other.level, Level::Error);
    assert!(other.message.contains("en-us"));
    let empty = notification_template("T", &template(vec![("en-us", true, false)]));
    assert_eq!(empty.level, Level::Error);
    assert_eq!(
        notification_template("T", &Lookup::Missing).level,
        Level::Error
    );
}

#[test]
fn an_empty_or_missing_group_is_an_error() {
    let findings = groups(&[
        (
            "Pilot".into(),
            Lookup::Found(FoundGroup {
                id: "g1".into(),
                has_members: true,
            }),
        ),
        (
            "Empty".into(),
            Lookup::Found(FoundGroup {
                id: "g2".into(),
                has_members: false,
            }),
        ),
        ("Gone".into(), Lookup::Missing),
    ]);
    assert_eq!(findings[0].level, Level::Ok);
    assert!(findings[1].message.contains("`Empty` has no members"));
    assert!(findings[2].message.contains("`Gone` not found"));
}

#[test]
fn a_directory_approver_group_the_tenant_lacks_or_that_is_empty_is_an_error_naming_it() {
    let findings = approver_groups(&[
        (
            "board".into(),
            "IT".into(),
            Lookup::Found(FoundGroup {
                id: "g1".into(),
                has_members: true,
            }),
        ),
        (
            "cab".into(),
            "Change Advisory Board".into(),
            Lookup::Missing,
        ),
        (
            "empty".into(),
            "Nobody".into(),
            Lookup::Found(FoundGroup {
                id: "g2".into(),
                has_members: false,
            }),
        ),
        ("twice".into(), "Twins".into(), Lookup::Ambiguous(2)),
    ]);
    assert_eq!(findings.len(), 4);
    assert_eq!(findings[0].level, Level::Ok);
    assert!(findings[0].message.contains("board (`IT`)"));
    assert!(findings[1..].iter().all(|f| f.level == Level::Error));
    assert!(
        findings[1]
            .message
            .contains("`Change Advisory Board` (approver group `cab`) not found")
    );
    assert!(
        findings[1]
            .fix
            .as_deref()
            .unwrap()
            .contains("`[directory_approvers]` cab")
    );
    assert!(findings[2].message.contains("has no members"));
    assert!(findings[3].message.contains("ambiguous"));
    // A plan without directory approver groups has nothing to check.
    assert!(approver_groups(&[]).is_empty());
}

fn ca(
    name: &str,
    state: &str,
    compliance: bool,
    mfa: bool,
    users: &[&str],
    groups: &[&str],
) -> CaPolicy {
    CaPolicy {
        id: format!("id-{name}"),
        name: name.into(),
        state: state.into(),
        requires_compliance: compliance,
        requires_mfa: mfa,
        include_users: users.iter().map(|s| s.to_string()).collect(),
        include_groups: groups.iter().map(|s| s.to_string()).collect(),
        exclude_groups: vec!["g-excluded".into()],
        include_platforms: Vec::new(),
        exclude_platforms: Vec::new(),
    }
}

#[test]
fn other_enabled_compliance_policies_reaching_the_scope_are_listed() {
    let scope: Scope = vec![
        ("Pilot".into(), Some("g1".into())),
        ("Excluded".into(), Some("g-excluded".into())),
    ];
    let policies = [
        ca("Own", "enabled", true, false, &["All"], &[]),
        ca("Baseline", "enabled", true, false, &["All"], &[]),
        ca(
            "Report only",
            "enabledForReportingButNotEnforced",
            true,
            false,
            &["All"],
            &[],
        ),
        ca("Other group", "enabled", true, false, &[], &["g9"]),
    ];
    let findings = overlapping_policies(&policies, Some("Own"), &scope, &[Platform::Windows]);
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].level, Level::Warning);
    assert!(findings[0].message.contains("`Baseline`"));
    assert!(findings[0].message.contains("Pilot"));
    assert!(!findings[0].message.contains("Excluded"));
    let none = overlapping_policies(&policies[2..], Some("Own"), &scope, &[Platform::Windows]);
    assert_eq!(none[0].level, Level::Ok);
    // A policy for other platforms does not overlap.
    let mut ios_only = ca("iOS only", "enabled", true, false, &["All"], &[]);
    ios_only.include_platforms = vec!["iOS".into()];
    let mut all_but_windows = ca("Not Windows", "enabled", true, false, &["All"], &[]);
    all_but_windows.include_platforms = vec!["all".into()];
    all_but_windows.exclude_platforms = vec!["windows".into()];
    let others = [ios_only, all_but_windows];
    let windows = overlapping_policies(&others, None, &scope, &[Platform::Windows]);
    assert_eq!(windows[0].level, Level::Ok, "{windows:?}");
    let ios = overlapping_policies(&others, None, &scope, &[Platform::Ios]);
    assert_eq!(ios.len(), 2, "{ios:?}");
}

#[test]
fn groups_no_enabled_mfa_policy_covers_are_named() {
    let scope: Scope = vec![
        ("Pilot".into(), Some("g1".into())),
        ("Field".into(), Some("g2".into())),
    ];
    let policies = [
        ca("MFA pilot", "enabled", false, true, &[], &["g1"]),
        ca("MFA off", "disabled", false, true, &["All"], &[]),
    ];
    let finding = mfa(&policies, &scope);
    assert_eq!(finding.level, Level::Warning);
    assert!(
        finding.message.ends_with("for Field"),
        "{}",
        finding.message
    );
    let everyone = [ca("MFA all", "enabled", false, true, &["All"], &[])];
    assert_eq!(mfa(&everyone, &scope).level, Level::Ok);
}

#[test]
fn a_missing_permission_is_an_error_naming_it() {
    let plan = plan("windows-baseline-graph.toml");
    let needed = needed_roles(&plan, false);
    let mut granted: Vec<String> = needed.iter().map(|(r, _)| r.to_string()).collect();
    assert_eq!(
        permissions(&needed, &Ok(granted.clone()))[0].level,
        Level::Ok
    );
    granted.retain(|r| r != "Policy.ReadWrite.ConditionalAccess");
    let findings = permissions(&needed, &Ok(granted));
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].level, Level::Error);
    assert!(
        findings[0]
            .message
            .contains("Policy.ReadWrite.ConditionalAccess")
    );
    // A ReadWrite role covers its Read role.
    let only_read_write = vec![
        "DeviceManagementConfiguration.ReadWrite.All".to_string(),
        "GroupMember.ReadWrite.All".into(),
        "DeviceManagementServiceConfig.ReadWrite.All".into(),
        "Policy.Read.All".into(),
        "Policy.ReadWrite.ConditionalAccess".into(),
        "Application.ReadWrite.All".into(),
    ];
    let findings = permissions(&needed, &Ok(only_read_write));
    assert_eq!(findings[0].level, Level::Ok, "{findings:?}");
}

#[test]
fn a_required_sign_in_criterion_needs_the_sign_in_log_permissions_and_an_optional_one_does_not() {
    let text = std::fs::read_to_string(format!(
        "{}/plans/windows-baseline-graph.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let with = |extra: &str| {
        let edited = text.replace(
            "[phase.rollback_when]\nblocked_ratio_above = \"5%\"",
            &format!("[phase.rollback_when]\nblocked_ratio_above = \"5%\"\nblocked_signins_above = 10\n{extra}"),
        );
        assert_ne!(edited, text);
        crate::adapters::parse_plan("plan.toml", &edited).unwrap()
    };
    let without = needed_roles(&plan("windows-baseline-graph.toml"), false);
    assert!(!without.iter().any(|(r, _)| *r == "AuditLog.Read.All"));
    let required = with("");
    let needed = needed_roles(&required, false);
    let granted: Vec<String> = without.iter().map(|(r, _)| r.to_string()).collect();
    let findings = permissions(&needed, &Ok(granted.clone()));
    let missing: Vec<&str> = findings
        .iter()
        .filter(|f| f.level == Level::Error)
        .map(|f| f.message.as_str())
        .collect();
    assert_eq!(missing.len(), 2, "{findings:?}");
    assert!(missing[0].contains("AuditLog.Read.All"), "{missing:?}");
    assert!(missing[1].contains("Directory.Read.All"), "{missing:?}");
    // `signin_data = "optional"` sits in the gate of the same phase.
    let optional_text = text.replace(
        "[phase.rollback_when]\nblocked_ratio_above = \"5%\"",
        "signin_data = \"optional\"\n\n[phase.rollback_when]\nblocked_ratio_above = \"5%\"\nblocked_signins_above = 10",
    );
    let optional = crate::adapters::parse_plan("plan.toml", &optional_text).unwrap();
    let findings = permissions(&needed_roles(&optional, false), &Ok(granted));
    assert_eq!(findings[0].level, Level::Ok, "{findings:?}");
}

fn member(name: &str, mail: Option<&str>, enabled: bool) -> Member {
    Member {
        id: name.into(),
        name: name.into(),
        mail: mail.map(Into::into),
        enabled,
    }
}

fn mailing(groups: &[&str], max_recipients: usize) -> Mailing {
    Mailing {
        addresses: vec!["helpdesk@contoso.com".into()],
        groups: groups.iter().map(|g| g.to_string()).collect(),
        max_recipients,
    }
}

#[test]
fn a_mailed_group_that_is_missing_empty_unreadable_or_reaches_nobody_is_an_error() {
    let pilot = vec![
        member("ann", Some("ann@contoso.com"), true),
        member("kiosk", None, true),
        member("left", Some("left@contoso.com"), false),
    ];
    let nobody = vec![member("bg1", None, true), member("bg2", None, true)];
    let found = vec![
        ("Pilot".to_string(), Lookup::Found(pilot)),
        ("Empty".into(), Lookup::Found(Vec::new())),
        ("Break Glass".into(), Lookup::Found(nobody)),
        ("Gone".into(), Lookup::Missing),
        (
            "Secret".into(),
            Lookup::Failed("403 Authorization_RequestDenied".into()),
        ),
    ];
    let findings = mailed_groups(
        &[mailing(
            &["Pilot", "Empty", "Break Glass", "Gone", "Secret"],
            500,
        )],
        &found,
    );
    assert_eq!(findings[0].level, Level::Ok);
    assert!(
        findings[0]
            .message
            .contains("`Pilot` (1 of 3 members, 1 without a mail address, 1 disabled)"),
        "{findings:?}"
    );
    let errors: Vec<&str> = findings[1..].iter().map(|f| f.message.as_str()).collect();
    assert!(
        findings[1..]
            .iter()
            .all(|f| f.level == Level::Error && f.check == MAILED)
    );
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors[0].contains("group `Empty`, which an e-mail announcement mails, has no members")
    );
    assert!(errors[1].contains(
        "nobody in group `Break Glass` can be mailed: 2 members, 2 without a mail address"
    ));
    assert!(errors[2].contains("group `Gone`, which an e-mail announcement mails, not found"));
    assert!(errors[3].contains("the members of group `Secret` cannot be read (403"));
    assert!(
        findings[4]
            .fix
            .as_deref()
            .unwrap()
            .contains("User.Read.All")
    );
}

#[test]
fn an_announcement_over_its_channels_max_recipients_is_an_error() {
    let many: Vec<Member> = (0..20)
        .map(|i| member(&format!("u{i}"), Some(&format!("u{i}@contoso.com")), true))
        .collect();
    let found = vec![("Sales".to_string(), Lookup::Found(many))];
    let fits = mailed_groups(&[mailing(&["Sales"], 21)], &found);
    assert!(fits.iter().all(|f| f.level == Level::Ok), "{fits:?}");
    let over = mailed_groups(&[mailing(&["Sales"], 20)], &found);
    let error = over.iter().find(|f| f.level == Level::Error).unwrap();
    assert!(
        error.message.contains("21 addresses, more than the 20"),
        "{}",
        error.message
    );
    assert!(error.fix.as_deref().unwrap().contains("max_recipients"));
}

#[test]
fn mailing_a_group_needs_the_users_mail_addresses() {
    let text = std::fs::read_to_string(format!(
        "{}/plans/multi-platform-graph.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let plain = crate::adapters::parse_plan("plan.toml", &text).unwrap();
    assert!(mailings(&plain).is_empty());
    assert!(
        !needed_roles(&plain, false)
            .iter()
            .any(|(r, _)| *r == "User.Read.All")
    );
    let edited = text.replacen(
        "[[phase]]",
        "[[announcement]]\nchannel = \"email\"\ngroups = [\"Pilot IT\"]\ntemplate = \"t\"\n\
         smtp_host = \"smtp.contoso.com\"\nfrom = \"pg@contoso.com\"\nmax_recipients = 50\n\n[[phase]]",
        1,
    );
    let mails = crate::adapters::parse_plan("plan.toml", &edited).unwrap();
    assert_eq!(mailings(&mails)[0].max_recipients, 50);
    let needed = needed_roles(&mails, false);
    let user_read = needed.iter().find(|(r, _)| *r == "User.Read.All").unwrap();
    assert!(
        user_read.1.contains("e-mail announcements"),
        "{user_read:?}"
    );
}
