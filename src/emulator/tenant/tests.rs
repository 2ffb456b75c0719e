//! The emulator's wire behaviour, request by request.

use super::*;

fn settings() -> Settings {
    Settings {
        devices: 400,
        seed: 7,
        faults: 0.0,
        fault_seed: 7,
        time_scale: None,
        tenant_domain: "contoso.onmicrosoft.com".into(),
        client_id: "app".into(),
        client_secret: "secret".into(),
        token_lifetime: Duration::from_secs(3600),
        token_uses: None,
        ca_requests_per_second: 1e9,
        remediation_half_life: Duration::from_secs(2 * 86_400),
    }
}

fn request(method: &str, url: &str, body: &str, token: Option<&str>) -> Request {
    let (path, query) = split_url(url);
    let mut headers = BTreeMap::new();
    if let Some(token) = token {
        headers.insert("authorization".to_string(), format!("Bearer {token}"));
    }
    Request {
        method: method.into(),
        path,
        query,
        headers,
        body: body.as_bytes().to_vec(),
        base_url: "http://localhost".into(),
    }
}

fn body(response: &Response) -> Value {
    match &response.body {
        Body::Json(v) => v.clone(),
        Body::Empty => Value::Null,
    }
}

fn signed_in() -> (Tenant, String) {
    let mut tenant = Tenant::new(settings());
    let form = "client_id=app&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&client_secret=secret&grant_type=client_credentials";
    let response = tenant.handle(&request(
        "POST",
        "/contoso.onmicrosoft.com/oauth2/v2.0/token",
        form,
        None,
    ));
    assert_eq!(response.status, 200);
    let token = body(&response)["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    (tenant, token)
}

fn policy_id(tenant: &mut Tenant, token: &str) -> String {
    let url = "/v1.0/deviceManagement/deviceCompliancePolicies?$filter=displayName%20eq%20'Windows%2010/11%20compliance%20baseline'";
    let response = tenant.handle(&request("GET", url, "", Some(token)));
    body(&response)["value"][0]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_token_endpoint_speaks_oauth() {
    let mut tenant = Tenant::new(settings());
    let wrong = "client_id=app&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&client_secret=nope&grant_type=client_credentials";
    let response = tenant.handle(&request(
        "POST",
        "/contoso.onmicrosoft.com/oauth2/v2.0/token",
        wrong,
        None,
    ));
    assert_eq!(response.status, 401);
    let b = body(&response);
    assert_eq!(b["error"], "invalid_client");
    assert!(
        b["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215")
    );
    assert_eq!(b["error_codes"][0], 7000215);
    let (_, token) = signed_in();
    assert!(!token.is_empty());
}

#[test]
fn graph_calls_need_a_valid_token() {
    let (mut tenant, _) = signed_in();
    let response = tenant.handle(&request("GET", "/v1.0/groups", "", Some("forged")));
    assert_eq!(response.status, 401);
    assert_eq!(
        body(&response)["error"]["code"],
        "InvalidAuthenticationToken"
    );
    assert!(
        response
            .headers
            .iter()
            .any(|(k, _)| k == "WWW-Authenticate")
    );
}

#[test]
fn tokens_expire_in_tenant_time() {
    let (mut tenant, token) = signed_in();
    tenant.set_clock(br#"{"advanceBySeconds": 3600}"#);
    let response = tenant.handle(&request("GET", "/v1.0/groups", "", Some(&token)));
    assert_eq!(response.status, 401);
}

#[test]
fn single_entities_are_not_wrapped_and_errors_carry_dates_without_zone() {
    let (mut tenant, token) = signed_in();
    let id = policy_id(&mut tenant, &token);
    let response = tenant.handle(&request(
        "GET",
        &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}"),
        "",
        Some(&token),
    ));
    let b = body(&response);
    assert!(b.get("value").is_none());
    assert!(b["@odata.context"].as_str().unwrap().ends_with("/$entity"));
    assert_eq!(
        b["@odata.type"],
        "#microsoft.graph.windows10CompliancePolicy"
    );
    assert!(
        b.get("assignments").is_none(),
        "navigation properties need $expand"
    );
    let missing = tenant.handle(&request(
        "GET",
        &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}/scheduledActionsForRule"),
        "",
        Some(&token),
    ));
    assert_eq!(missing.status, 400);
    let e = body(&missing);
    assert_eq!(e["error"]["code"], "No method match route template");
    assert!(
        !e["error"]["innerError"]["date"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

#[test]
fn assign_replaces_the_whole_set_and_the_single_routes_do_not_exist() {
    let (mut tenant, token) = signed_in();
    let id = policy_id(&mut tenant, &token);
    let groups = body(&tenant.handle(&request(
        "GET",
        "/v1.0/groups?$filter=displayName%20eq%20'Finance'",
        "",
        Some(&token),
    )));
    let finance = groups["value"][0]["id"].as_str().unwrap().to_string();
    let assign = format!(
        r##"{{"assignments":[{{"target":{{"@odata.type":"#microsoft.graph.groupAssignmentTarget","groupId":"{finance}"}}}},{{"target":{{"@odata.type":"#microsoft.graph.allLicensedUsersAssignmentTarget"}}}}]}}"##
    );
    let path = format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}/assign");
    assert_eq!(
        tenant
            .handle(&request("POST", &path, &assign, Some(&token)))
            .status,
        200
    );
    let only_all = r##"{"assignments":[{"target":{"@odata.type":"#microsoft.graph.allLicensedUsersAssignmentTarget"}}]}"##;
    assert_eq!(
        tenant
            .handle(&request("POST", &path, only_all, Some(&token)))
            .status,
        200
    );
    let listed = body(&tenant.handle(&request(
        "GET",
        &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}/assignments"),
        "",
        Some(&token),
    )));
    let items = listed["value"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], format!("{id}_{ALL_USERS_ID}"));
    let single = tenant.handle(&request(
        "POST",
        &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}/assignments"),
        only_all,
        Some(&token),
    ));
    assert_eq!(single.status, 400);
    assert_eq!(
        tenant.ledger.len(),
        2,
        "only accepted writes are in the ledger"
    );
}

#[test]
fn a_policy_must_keep_exactly_one_block_action() {
    let (mut tenant, token) = signed_in();
    let id = policy_id(&mut tenant, &token);
    let path =
        format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}/scheduleActionsForRules");
    let none = r#"{"deviceComplianceScheduledActionForRules":[{"ruleName":"PasswordRequired","scheduledActionConfigurations":[{"actionType":"notification","gracePeriodHours":0,"notificationTemplateId":"t"}]}]}"#;
    let refused = tenant.handle(&request("POST", &path, none, Some(&token)));
    assert_eq!(refused.status, 400);
    let message = body(&refused)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with('{') && message.contains("one and only one block"),
        "Intune's JSON-in-message envelope: {message}"
    );
    let ok = r#"{"deviceComplianceScheduledActionForRules":[{"ruleName":"PasswordRequired","scheduledActionConfigurations":[{"actionType":"block","gracePeriodHours":72,"notificationTemplateId":""}]}]}"#;
    let accepted = tenant.handle(&request("POST", &path, ok, Some(&token)));
    assert_eq!(accepted.status, 204);
    let expanded = body(&tenant.handle(&request("GET", &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}?$expand=assignments,scheduledActionsForRule($expand=scheduledActionConfigurations)"), "", Some(&token))));
    let action = &expanded["scheduledActionsForRule"][0]["scheduledActionConfigurations"][0];
    assert_eq!(action["gracePeriodHours"], 72);
    assert_eq!(action["notificationTemplateId"], NIL_GUID);
    assert_eq!(
        expanded["scheduledActionsForRule"][0]["ruleName"],
        Value::Null
    );
}

#[test]
fn device_statuses_are_paged_with_skip_tokens() {
    let mut s = settings();
    s.devices = 5_000;
    let mut tenant = Tenant::new(s);
    let form = "client_id=app&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&client_secret=secret&grant_type=client_credentials";
    let token = body(&tenant.handle(&request(
        "POST",
        "/contoso.onmicrosoft.com/oauth2/v2.0/token",
        form,
        None,
    )))["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let id = policy_id(&mut tenant, &token);
    let all = r##"{"assignments":[{"target":{"@odata.type":"#microsoft.graph.allLicensedUsersAssignmentTarget"}}]}"##;
    tenant.handle(&request(
        "POST",
        &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{id}/assign"),
        all,
        Some(&token),
    ));
    tenant.set_clock(br#"{"advanceBySeconds": 86400}"#);
    let token = body(&tenant.handle(&request(
        "POST",
        "/contoso.onmicrosoft.com/oauth2/v2.0/token",
        form,
        None,
    )))["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let mut next = Some(format!(
        "/v1.0/deviceManagement/deviceCompliancePolicies/{id}/deviceStatuses"
    ));
    let mut seen = 0;
    let mut pages = 0;
    while let Some(url) = next {
        let url = url.trim_start_matches("http://localhost").to_string();
        let page = body(&tenant.handle(&request("GET", &url, "", Some(&token))));
        let items = page["value"]
            .as_array()
            .unwrap_or_else(|| panic!("{url}: {page}"));
        seen += items.len();
        pages += 1;
        let first = &items[0];
        assert!(
            ["compliant", "nonCompliant", "error", "conflict", "unknown"]
                .contains(&first["status"].as_str().unwrap())
        );
        assert!(
            first["lastReportedDateTime"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        next = page["@odata.nextLink"].as_str().map(str::to_string);
    }
    let windows = tenant.fleet.platform_counts()[0].1;
    assert_eq!(seen, windows);
    assert_eq!(pages, windows.div_ceil(1000));
}

#[test]
fn member_casts_need_eventual_consistency_and_top_stops_at_999() {
    let (mut tenant, token) = signed_in();
    let groups = body(&tenant.handle(&request(
        "GET",
        "/v1.0/groups?$filter=displayName%20eq%20'Sales'",
        "",
        Some(&token),
    )));
    let sales = groups["value"][0]["id"].as_str().unwrap().to_string();
    let url =
        format!("/v1.0/groups/{sales}/transitiveMembers/microsoft.graph.user?$count=true&$top=999");
    assert_eq!(
        tenant
            .handle(&request("GET", &url, "", Some(&token)))
            .status,
        400
    );
    let mut eventual = request("GET", &url, "", Some(&token));
    eventual
        .headers
        .insert("consistencylevel".into(), "eventual".into());
    let page = body(&tenant.handle(&eventual));
    assert!(page["@odata.count"].as_u64().unwrap() > 0);
    let mut too_big = request("GET", &url.replace("999", "1000"), "", Some(&token));
    too_big
        .headers
        .insert("consistencylevel".into(), "eventual".into());
    let refused = tenant.handle(&too_big);
    assert_eq!(refused.status, 400);
    assert_eq!(body(&refused)["error"]["code"], "Request_UnsupportedQuery");
}

#[test]
fn conditional_access_patches_merge_and_answer_204() {
    let (mut tenant, token) = signed_in();
    let list = body(&tenant.handle(&request(
        "GET",
        "/v1.0/identity/conditionalAccess/policies",
        "",
        Some(&token),
    )));
    let id = list["value"][0]["id"].as_str().unwrap().to_string();
    let path = format!("/v1.0/identity/conditionalAccess/policies/{id}");
    let patched = tenant.handle(&request(
        "PATCH",
        &path,
        r#"{"state":"enabledForReportingButNotEnforced"}"#,
        Some(&token),
    ));
    assert_eq!(patched.status, 204);
    assert!(matches!(patched.body, Body::Empty));
    let policy = body(&tenant.handle(&request("GET", &path, "", Some(&token))));
    assert_eq!(policy["state"], "enabledForReportingButNotEnforced");
    assert_eq!(
        policy["conditions"]["users"]["includeUsers"][0], "None",
        "untouched fields stay"
    );
    assert_eq!(
        policy["grantControls"]["builtInControls"][0],
        "compliantDevice"
    );
}

#[test]
fn conditional_access_is_rate_limited_without_retry_after() {
    let (mut tenant, token) = signed_in();
    tenant.settings.ca_requests_per_second = 1.0;
    let url = "/v1.0/identity/conditionalAccess/policies";
    assert_eq!(
        tenant.handle(&request("GET", url, "", Some(&token))).status,
        200
    );
    let second = tenant.handle(&request("GET", url, "", Some(&token)));
    assert_eq!(second.status, 429);
    assert!(
        !second
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
    );
}

#[test]
fn a_batch_answers_each_request_and_refuses_more_than_twenty() {
    let (mut tenant, token) = signed_in();
    let batch = r#"{"requests":[{"id":"1","method":"GET","url":"/groups?$filter=displayName eq 'Finance'"},{"id":"2","method":"GET","url":"/deviceManagement/notificationMessageTemplates"}]}"#;
    let reply = body(&tenant.handle(&request("POST", "/v1.0/$batch", batch, Some(&token))));
    let responses = reply["responses"].as_array().unwrap();
    assert_eq!(responses.len(), 2);
    assert!(responses.iter().all(|r| r["status"] == 200));
    assert_eq!(responses[0]["body"]["value"][0]["displayName"], "Finance");
    let many: Vec<String> = (0..21)
        .map(|i| format!(r#"{{"id":"{i}","method":"GET","url":"/groups"}}"#))
        .collect();
    let too_many = format!(r#"{{"requests":[{}]}}"#, many.join(","));
    assert_eq!(
        tenant
            .handle(&request("POST", "/v1.0/$batch", &too_many, Some(&token)))
            .status,
        400
    );
}

#[test]
fn filters_and_skip_tokens_round_trip() {
    assert_eq!(
        parse_display_name_filter("displayName eq 'O''Brien'"),
        Some("O'Brien".into())
    );
    assert_eq!(
        parse_display_name_filter("startswith(displayName,'a')"),
        None
    );
    assert_eq!(decode_skiptoken(&encode_skiptoken(12_345)), Some(12_345));
    let (path, query) = split_url("/a%20b?x=1&%24top=5");
    assert_eq!(path, "/a b");
    assert_eq!(
        query,
        vec![("x".into(), "1".into()), ("$top".into(), "5".into())]
    );
}

#[test]
fn guids_are_stable_and_well_formed() {
    let a = guid(7, "group", "Finance");
    assert_eq!(a, guid(7, "group", "Finance"));
    assert_ne!(a, guid(8, "group", "Finance"));
    assert!(crate::graph::is_guid(&a), "{a}");
}
