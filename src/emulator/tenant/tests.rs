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
        credentials: Default::default(),
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
fn device_statuses_are_user_device_pairs_paged_with_skip_tokens() {
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
    let mut per_device: BTreeMap<String, Vec<String>> = BTreeMap::new();
    while let Some(url) = next {
        let url = url.trim_start_matches("http://localhost").to_string();
        let page = body(&tenant.handle(&request("GET", &url, "", Some(&token))));
        let items = page["value"]
            .as_array()
            .unwrap_or_else(|| panic!("{url}: {page}"));
        assert!(items.len() <= 1000);
        seen += items.len();
        pages += 1;
        for item in items {
            per_device
                .entry(item["deviceDisplayName"].as_str().unwrap().to_string())
                .or_default()
                .push(item["userPrincipalName"].as_str().unwrap().to_string());
        }
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
    // Each device listed, a shared one once per user, a userless one as the system account.
    let windows = tenant.fleet.platform_counts()[0].1;
    assert_eq!(per_device.len(), windows);
    let shared = per_device.values().filter(|u| u.len() == 2).count();
    let system = per_device
        .values()
        .filter(|u| u == &&vec![SYSTEM_ACCOUNT.to_string()])
        .count();
    assert!(
        shared > 0 && system > 0,
        "{shared} shared, {system} userless"
    );
    assert_eq!(seen, windows + shared);
    assert!(
        per_device
            .values()
            .all(|u| u.len() == 1 || (u.len() == 2 && u[0] != u[1]))
    );
    assert_eq!(pages, seen.div_ceil(1000));
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

// --- The lived-in remodel: versions, CA stored whole, per-device grace, MAA, another admin. ---

const HOUR: u64 = 3_600;
const DAY: u64 = 24 * HOUR;

/// A tenant with a long-lived token, and helpers to talk to it.
struct Session {
    tenant: Tenant,
    token: String,
}

impl Session {
    fn new(setup: Setup) -> Session {
        let mut s = settings();
        s.token_lifetime = Duration::from_secs(400 * DAY);
        Session::with(s, setup)
    }

    fn with(settings: Settings, setup: Setup) -> Session {
        let mut tenant = Tenant::with_setup(settings, setup);
        let form = "client_id=app&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default&client_secret=secret&grant_type=client_credentials";
        let response = tenant.handle(&request(
            "POST",
            "/contoso.onmicrosoft.com/oauth2/v2.0/token",
            form,
            None,
        ));
        let token = body(&response)["access_token"]
            .as_str()
            .unwrap()
            .to_string();
        Session { tenant, token }
    }

    fn send(&mut self, method: &str, url: &str, body: &str, headers: &[(&str, &str)]) -> Response {
        let mut r = request(method, url, body, Some(&self.token));
        for (k, v) in headers {
            r.headers.insert(k.to_string(), v.to_string());
        }
        self.tenant.handle(&r)
    }

    fn call(&mut self, method: &str, url: &str, body: &str) -> (u16, Value) {
        let response = self.send(method, url, body, &[]);
        (response.status, super::tests::body(&response))
    }

    fn get(&mut self, url: &str) -> Value {
        let (status, value) = self.call("GET", url, "");
        assert_eq!(status, 200, "GET {url}: {value}");
        value
    }

    /// A control endpoint (no token).
    fn control(&mut self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let response = self.tenant.handle(&request(method, path, body, None));
        (response.status, super::tests::body(&response))
    }

    fn advance(&mut self, seconds: u64) {
        self.tenant
            .set_clock(format!(r#"{{"advanceBySeconds": {seconds}}}"#).as_bytes());
    }

    fn policy(&mut self, platform: Platform) -> String {
        let name = POLICY_NAMES.iter().find(|(p, _)| *p == platform).unwrap().1;
        let url = format!(
            "/v1.0/deviceManagement/deviceCompliancePolicies?$filter=displayName%20eq%20'{}'",
            name.replace(' ', "%20")
        );
        self.get(&url)["value"][0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn group(&mut self, name: &str) -> String {
        let url = format!(
            "/v1.0/groups?$filter=displayName%20eq%20'{}'",
            name.replace(' ', "%20")
        );
        self.get(&url)["value"][0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn ca_id(&mut self) -> String {
        self.get("/v1.0/identity/conditionalAccess/policies")["value"][0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn assign(&mut self, policy: &str, targets: &str) -> u16 {
        let url = format!("/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/assign");
        let body = format!(r#"{{"assignments":[{targets}]}}"#);
        self.call("POST", &url, &body).0
    }

    fn assign_all_users(&mut self, policy: &str) {
        let all =
            r##"{"target":{"@odata.type":"#microsoft.graph.allLicensedUsersAssignmentTarget"}}"##;
        assert_eq!(self.assign(policy, all), 200);
    }

    fn set_actions(&mut self, policy: &str, actions: &str) {
        let url = format!(
            "/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/scheduleActionsForRules"
        );
        let body = format!(
            r#"{{"deviceComplianceScheduledActionForRules":[{{"ruleName":"PasswordRequired","scheduledActionConfigurations":[{actions}]}}]}}"#
        );
        let (status, value) = self.call("POST", &url, &body);
        assert_eq!(status, 204, "{value}");
    }

    fn patch_ca(&mut self, id: &str, patch: &str) {
        let url = format!("/v1.0/identity/conditionalAccess/policies/{id}");
        let (status, value) = self.call("PATCH", &url, patch);
        assert_eq!(status, 204, "{patch}: {value}");
    }

    /// Every device's first `deviceStatuses` row of a policy, following next links.
    fn rows(&mut self, policy: &str) -> Vec<Value> {
        let mut rows = Vec::new();
        let mut next = Some(format!(
            "/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/deviceStatuses"
        ));
        while let Some(url) = next {
            let page = self.get(url.trim_start_matches("http://localhost"));
            // One row per device: the device's first user–device pair.
            for row in page["value"].as_array().unwrap() {
                if rows.last().is_none_or(|last: &Value| {
                    last["deviceDisplayName"] != row["deviceDisplayName"]
                }) {
                    rows.push(row.clone());
                }
            }
            next = page["@odata.nextLink"].as_str().map(str::to_string);
        }
        rows
    }

    /// The devices Conditional Access blocks now.
    fn blocked_now(&mut self) -> Vec<u64> {
        let (_, blocks) = self.control("GET", "/_emulator/blocks", "");
        blocks["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["until"].is_null())
            .map(|b| b["device"].as_u64().unwrap())
            .collect()
    }

    fn now(&self) -> Timestamp {
        self.tenant.now()
    }
}

fn time(value: &Value) -> Timestamp {
    crate::graph::parse_time(value.as_str().unwrap()).unwrap()
}

/// The fleet's device number, from `deviceDisplayName` (`WINDOWS-0000042`).
fn device_number(row: &Value) -> u64 {
    row["deviceDisplayName"]
        .as_str()
        .unwrap()
        .rsplit('-')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The user id in a row's composite id (`{device}_{policy}_{user}`).
fn row_user(row: &Value) -> String {
    row["id"]
        .as_str()
        .unwrap()
        .rsplit('_')
        .next()
        .unwrap()
        .to_string()
}

fn noncompliant(rows: &[Value]) -> Vec<Value> {
    rows.iter()
        .filter(|r| r["status"] == "nonCompliant")
        .cloned()
        .collect()
}

fn intune_message(value: &Value) -> String {
    value["error"]["message"].as_str().unwrap().to_string()
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn assignments_have_the_shape_of_their_version_and_v1_refuses_filter_fields() {
    let mut s = Session::new(Setup::default());
    let policy = s.policy(Platform::Windows);
    let pilot = s.group("Pilot IT");
    let finance = s.group("Finance");
    let filter = "93d20a3f-d668-450f-b5e1-9a84b84e0c08";
    let filtered = format!(
        r##"{{"target":{{"@odata.type":"#microsoft.graph.groupAssignmentTarget","groupId":"{pilot}","deviceAndAppManagementAssignmentFilterId":"{filter}","deviceAndAppManagementAssignmentFilterType":"include"}}}},{{"target":{{"@odata.type":"microsoft.graph.exclusionGroupAssignmentTarget","groupId":"{finance}"}}}},{{"target":{{"@odata.type":"#microsoft.graph.configurationManagerCollectionAssignmentTarget","collectionId":"SMS00001"}}}}"##
    );
    // Through v1.0 the filter fields do not exist on the type.
    let (status, refused) = s.call(
        "POST",
        &format!("/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/assign"),
        &format!(r#"{{"assignments":[{filtered}]}}"#),
    );
    assert_eq!(status, 400);
    assert!(intune_message(&refused).contains("does not exist on type"));
    // Through beta they are stored and returned.
    let (status, _) = s.call(
        "POST",
        &format!("/beta/deviceManagement/deviceCompliancePolicies/{policy}/assign"),
        &format!(r#"{{"assignments":[{filtered}]}}"#),
    );
    assert_eq!(status, 200);
    let beta = s.get(&format!(
        "/beta/deviceManagement/deviceCompliancePolicies/{policy}/assignments"
    ));
    let items = beta["value"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["id"], format!("{policy}_{pilot}"));
    assert_eq!(items[0]["source"], "direct");
    assert_eq!(items[0]["sourceId"], policy);
    assert_eq!(
        items[0]["target"]["deviceAndAppManagementAssignmentFilterId"],
        filter
    );
    assert_eq!(
        items[0]["target"]["deviceAndAppManagementAssignmentFilterType"],
        "include"
    );
    assert_eq!(
        items[1]["target"]["@odata.type"], "#microsoft.graph.exclusionGroupAssignmentTarget",
        "the type is stored normalized"
    );
    assert_eq!(
        items[1]["target"]["deviceAndAppManagementAssignmentFilterType"],
        "none"
    );
    assert_eq!(
        items[1]["target"]["deviceAndAppManagementAssignmentFilterId"],
        Value::Null
    );
    assert_eq!(items[2]["id"], format!("{policy}_SMS00001"));
    assert_eq!(items[2]["target"]["collectionId"], "SMS00001");
    // v1.0 shows the same assignments without source and filter fields.
    let v1 = s.get(&format!(
        "/v1.0/deviceManagement/deviceCompliancePolicies/{policy}?$expand=assignments"
    ));
    assert_eq!(
        v1["assignments"][0],
        json!({"id": format!("{policy}_{pilot}"), "target": {"@odata.type": "#microsoft.graph.groupAssignmentTarget", "groupId": pilot}})
    );
    assert!(v1["assignments"][2]["target"].get("collectionId").is_some());
    // A v1.0 assign replaces the set with unfiltered targets.
    let plain = format!(
        r##"{{"target":{{"@odata.type":"#microsoft.graph.groupAssignmentTarget","groupId":"{pilot}"}}}}"##
    );
    assert_eq!(s.assign(&policy, &plain), 200);
    let beta = s.get(&format!(
        "/beta/deviceManagement/deviceCompliancePolicies/{policy}?$expand=assignments"
    ));
    assert_eq!(beta["assignments"].as_array().unwrap().len(), 1);
    assert_eq!(
        beta["assignments"][0]["target"]["deviceAndAppManagementAssignmentFilterType"],
        "none"
    );
    // Unknown types, unknown groups; a duplicate target is ignored.
    let scope = r##"{"target":{"@odata.type":"#microsoft.graph.scopeTagGroupAssignmentTarget","entraObjectId":"x"}}"##;
    assert_eq!(s.assign(&policy, scope), 400);
    let ghost = r##"{"target":{"@odata.type":"#microsoft.graph.groupAssignmentTarget","groupId":"00000000-0000-4000-a000-000000000001"}}"##;
    assert_eq!(s.assign(&policy, ghost), 400);
    assert_eq!(s.assign(&policy, &format!("{plain},{plain}")), 200);
    let listed = s.get(&format!(
        "/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/assignments"
    ));
    assert_eq!(listed["value"].as_array().unwrap().len(), 1);
}

#[test]
fn compliance_policies_patch_names_and_descriptions_only() {
    let mut s = Session::new(Setup::default());
    let policy = s.policy(Platform::Windows);
    let url = format!("/v1.0/deviceManagement/deviceCompliancePolicies/{policy}");
    let before = s.get(&url);
    assert_eq!(before["description"], Value::Null);
    let (status, _) = s.call("PATCH", &url, r#"{"description":"no type"}"#);
    assert_eq!(status, 400, "the body must name the policy's type");
    let (status, _) = s.call(
        "PATCH",
        &url,
        r##"{"@odata.type":"#microsoft.graph.iosCompliancePolicy","description":"wrong type"}"##,
    );
    assert_eq!(status, 400);
    let (status, _) = s.call(
        "PATCH",
        &url,
        r##"{"@odata.type":"#microsoft.graph.windows10CompliancePolicy","scheduledActionsForRule":[]}"##,
    );
    assert_eq!(
        status, 400,
        "actions change through scheduleActionsForRules"
    );
    s.advance(60);
    let (status, patched) = s.call(
        "PATCH",
        &url,
        r##"{"@odata.type":"microsoft.graph.windows10CompliancePolicy","description":"Windows baseline v4"}"##,
    );
    assert_eq!(status, 200);
    assert_eq!(patched["description"], "Windows baseline v4");
    assert_eq!(patched["displayName"], before["displayName"]);
    assert_eq!(patched["version"], before["version"].as_i64().unwrap() + 1);
    assert!(time(&patched["lastModifiedDateTime"]) > time(&before["lastModifiedDateTime"]));
    assert!(patched.get("assignments").is_none());
    assert_eq!(s.tenant.ledger.len(), 1);
    assert_eq!(s.tenant.ledger[0].method, "PATCH");
}

#[test]
fn actions_keep_their_fields_and_grace_stays_within_a_year() {
    let mut s = Session::new(Setup::default());
    let policy = s.policy(Platform::Windows);
    let url =
        format!("/beta/deviceManagement/deviceCompliancePolicies/{policy}/scheduleActionsForRules");
    let body = |hours: i64| {
        format!(
            r#"{{"deviceComplianceScheduledActionForRules":[{{"ruleName":"PasswordRequired","scheduledActionConfigurations":[{{"actionType":"block","gracePeriodHours":{hours},"notificationTemplateId":""}},{{"actionType":"notification","gracePeriodHours":72,"notificationTemplateId":"t1","notificationMessageCCList":["g1"]}},{{"actionType":"remoteLock","gracePeriodHours":240}}]}}]}}"#
        )
    };
    assert_eq!(s.call("POST", &url, &body(8761)).0, 400);
    assert_eq!(
        s.call("POST", &url.replace("/beta/", "/v1.0/"), &body(24))
            .0,
        400,
        "remoteLock is beta-only"
    );
    assert_eq!(s.call("POST", &url, &body(24)).0, 204);
    let expanded = s.get(&format!("/v1.0/deviceManagement/deviceCompliancePolicies/{policy}?$expand=scheduledActionsForRule($expand=scheduledActionConfigurations)"));
    assert!(expanded.get("assignments").is_none());
    let actions = expanded["scheduledActionsForRule"][0]["scheduledActionConfigurations"]
        .as_array()
        .unwrap();
    assert_eq!(actions.len(), 3);
    assert_eq!(actions[0]["notificationTemplateId"], NIL_GUID);
    assert_eq!(actions[1]["notificationMessageCCList"], json!(["g1"]));
    assert_eq!(actions[2]["actionType"], "remoteLock");
    assert_eq!(actions[2]["notificationMessageCCList"], json!([]));
}

#[test]
fn conditional_access_patches_merge_objects_and_replace_arrays() {
    let mut s = Session::new(Setup::default());
    let id = s.ca_id();
    let finance = s.group("Finance");
    let sales = s.group("Sales");
    let bg = s.group("Break Glass");
    let url = format!("/v1.0/identity/conditionalAccess/policies/{id}");
    s.patch_ca(
        &id,
        &format!(
            r#"{{"conditions":{{"users":{{"includeUsers":[],"includeGroups":["{finance}"],"excludeGroups":["{bg}"],"excludeUsers":["u1"]}}}}}}"#
        ),
    );
    // A users PATCH that only sends includeGroups keeps the exclusions.
    s.patch_ca(
        &id,
        &format!(r#"{{"conditions":{{"users":{{"includeGroups":["{finance}","{sales}"]}}}}}}"#),
    );
    let policy = s.get(&url);
    let users = &policy["conditions"]["users"];
    assert_eq!(users["includeGroups"], json!([finance, sales]));
    assert_eq!(users["excludeGroups"], json!([bg]));
    assert_eq!(users["excludeUsers"], json!(["u1"]));
    assert_eq!(
        policy["conditions"]["applications"]["includeApplications"],
        json!(["Office365"]),
        "other conditions are untouched"
    );
    // An array sent replaces the old one, even an empty one.
    s.patch_ca(&id, r#"{"conditions":{"users":{"excludeUsers":[]}}}"#);
    let users = s.get(&url)["conditions"]["users"].clone();
    assert_eq!(users["excludeUsers"], json!([]));
    assert_eq!(users["excludeGroups"], json!([bg]));
    // Complex values merge member by member; read-only fields stay.
    let created = s.get(&url)["createdDateTime"].clone();
    s.patch_ca(
        &id,
        r#"{"id":"other","createdDateTime":"2020-01-01T00:00:00Z","sessionControls":{"signInFrequency":{"value":4,"type":"hours","isEnabled":true}},"grantControls":{"builtInControls":["mfa"]}}"#,
    );
    s.patch_ca(
        &id,
        r#"{"sessionControls":{"persistentBrowser":{"mode":"never","isEnabled":true}},"grantControls":{"authenticationStrength":{"id":"00000000-0000-0000-0000-000000000004"}}}"#,
    );
    let policy = s.get(&url);
    assert_eq!(policy["id"], id);
    assert_eq!(policy["createdDateTime"], created);
    assert!(!policy["modifiedDateTime"].is_null());
    assert_eq!(policy["sessionControls"]["signInFrequency"]["value"], 4);
    assert_eq!(
        policy["sessionControls"]["persistentBrowser"]["mode"],
        "never"
    );
    assert_eq!(policy["grantControls"]["operator"], "OR");
    assert_eq!(policy["grantControls"]["builtInControls"], json!(["mfa"]));
    let strength = &policy["grantControls"]["authenticationStrength"];
    assert_eq!(strength["displayName"], "Phishing-resistant MFA");
    assert_eq!(strength["policyType"], "builtIn");
    assert_eq!(strength["requirementsSatisfied"], "mfa");
    assert!(strength["allowedCombinations"].as_array().unwrap().len() >= 3);
    assert_eq!(policy["description"], Value::Null);
    // Unknown strengths and states are refused, and nothing changes.
    let (status, _) = s.call(
        "PATCH",
        &url,
        r#"{"grantControls":{"authenticationStrength":{"id":"00000000-0000-0000-0000-000000000009"}}}"#,
    );
    assert_eq!(status, 400);
    let (status, _) = s.call("PATCH", &url, r#"{"state":"on"}"#);
    assert_eq!(status, 400);
    assert_eq!(
        s.get(&url)["grantControls"]["authenticationStrength"]["id"],
        "00000000-0000-0000-0000-000000000004"
    );
}

#[test]
fn grace_counts_from_each_devices_first_noncompliance_as_configured_now() {
    let mut s = Session::new(Setup::default());
    let t0 = s.now();
    let policy = s.policy(Platform::Windows);
    s.assign_all_users(&policy);
    // Newly covered devices are pending until they check in.
    let rows = s.rows(&policy);
    assert!(!rows.is_empty());
    assert!(
        rows.iter()
            .all(|r| r["status"] == "unknown"
                && r["lastReportedDateTime"] == crate::graph::UNSET_TIME)
    );
    s.advance(DAY);
    let failing = noncompliant(&s.rows(&policy));
    assert!(!failing.is_empty());
    // Under grace 0 the grace ends at the first noncompliant evaluation: the first check-in.
    let first: BTreeMap<String, Timestamp> = failing
        .iter()
        .map(|r| {
            let end = time(&r["complianceGracePeriodExpirationDateTime"]);
            assert!(
                end > t0 && end <= t0.plus(Duration::from_secs(8 * HOUR)),
                "{r}"
            );
            assert!(end < s.now(), "past grace: noncompliant");
            (r["id"].as_str().unwrap().to_string(), end)
        })
        .collect();
    // Day 3: the grace becomes 7 days. Each device's grace now ends 7 days after *its* first
    // noncompliance, not 7 days after the change.
    s.advance(2 * DAY);
    let day3 = s.now();
    s.set_actions(
        &policy,
        r#"{"actionType":"block","gracePeriodHours":168,"notificationTemplateId":""}"#,
    );
    let week = Duration::from_secs(7 * DAY);
    let check = |s: &mut Session, in_grace: bool| {
        let now = s.now();
        for row in noncompliant(&s.rows(&policy)) {
            let id = row["id"].as_str().unwrap();
            let end = time(&row["complianceGracePeriodExpirationDateTime"]);
            let start = first[id];
            assert_eq!(end, start.plus(week), "{row}");
            assert_ne!(end, day3.plus(week));
            assert_eq!(now < end, in_grace);
        }
    };
    check(&mut s, true);
    s.advance(8 * HOUR);
    check(&mut s, true);
    // After t0 + 7 days they are out of grace again.
    s.tenant.set_clock(
        format!(
            r#"{{"advanceTo": "{}"}}"#,
            format_time(t0.plus(week).plus(Duration::from_secs(9 * HOUR)))
        )
        .as_bytes(),
    );
    assert!(!noncompliant(&s.rows(&policy)).is_empty());
    check(&mut s, false);
}

#[test]
fn raising_the_grace_unblocks_at_the_next_check_in() {
    let mut s = Session::new(Setup {
        ca_state: Some(CaState::Enabled),
        ..Setup::default()
    });
    let policy = s.policy(Platform::Windows);
    let ca = s.ca_id();
    s.patch_ca(&ca, r#"{"conditions":{"users":{"includeUsers":["All"]}}}"#);
    s.assign_all_users(&policy);
    s.advance(DAY);
    let blocked = s.blocked_now();
    assert_eq!(blocked.len(), noncompliant(&s.rows(&policy)).len());
    assert!(!blocked.is_empty());
    s.set_actions(
        &policy,
        r#"{"actionType":"block","gracePeriodHours":168,"notificationTemplateId":""}"#,
    );
    // The device's state changes when it is next evaluated.
    s.advance(8 * HOUR);
    assert!(s.blocked_now().is_empty());
    let state = s.control("GET", "/_emulator/state", "").1;
    assert_eq!(state["policies"][0]["deviceStatuses"]["blocked"], 0);
}

#[test]
fn a_notification_added_on_day_six_reaches_devices_failing_since_day_zero_at_their_next_check_in() {
    let mut s = Session::new(Setup::default());
    let policy = s.policy(Platform::Windows);
    s.assign_all_users(&policy);
    s.advance(6 * DAY);
    let failing: Vec<u64> = noncompliant(&s.rows(&policy))
        .iter()
        .map(device_number)
        .collect();
    assert!(!failing.is_empty());
    let (_, sent) = s.control("GET", "/_emulator/notifications", "");
    assert_eq!(sent["value"], json!([]), "no notification action yet");
    let day6 = s.now();
    let template = guid(7, "template", TEMPLATE_NAME);
    s.set_actions(
        &policy,
        &format!(
            r#"{{"actionType":"block","gracePeriodHours":0,"notificationTemplateId":""}},{{"actionType":"notification","gracePeriodHours":72,"notificationTemplateId":"{template}"}},{{"actionType":"pushNotification","gracePeriodHours":0,"notificationTemplateId":""}}"#
        ),
    );
    s.advance(8 * HOUR);
    let (_, sent) = s.control("GET", "/_emulator/notifications", "");
    let sent = sent["value"].as_array().unwrap().clone();
    let mut notified: Vec<u64> = sent.iter().map(|n| n["device"].as_u64().unwrap()).collect();
    notified.sort();
    let mut expected = failing.clone();
    expected.sort();
    assert_eq!(
        notified, expected,
        "each failing device, once, by e-mail only"
    );
    for n in &sent {
        let at = time(&n["at"]);
        assert!(at > day6 && at <= s.now(), "{n}");
        assert_eq!(n["templateId"], template);
        assert!(
            n["userPrincipalName"]
                .as_str()
                .unwrap()
                .ends_with("@contoso.onmicrosoft.com")
        );
    }
    // Once per episode: later check-ins send nothing more.
    s.advance(2 * DAY);
    let (_, again) = s.control("GET", "/_emulator/notifications", "");
    assert_eq!(again["value"].as_array().unwrap().len(), sent.len());
    // Told owners fix their devices (stubborn ones never do).
    s.advance(20 * DAY);
    let still = noncompliant(&s.rows(&policy)).len();
    assert!(still < failing.len() / 2, "{still} of {}", failing.len());
}

#[test]
fn only_an_enforcing_policy_blocks_and_it_respects_excluded_users_and_platforms() {
    let mut s = Session::new(Setup::default());
    let windows = s.policy(Platform::Windows);
    let ios = s.policy(Platform::Ios);
    s.assign_all_users(&windows);
    s.assign_all_users(&ios);
    s.advance(DAY);
    let windows_failing = noncompliant(&s.rows(&windows));
    let ios_failing = noncompliant(&s.rows(&ios));
    assert!(!windows_failing.is_empty() && !ios_failing.is_empty());
    assert!(s.blocked_now().is_empty(), "the CA policy is disabled");
    let ca = s.ca_id();
    // Report-only does not block either.
    s.patch_ca(
        &ca,
        r#"{"state":"enabledForReportingButNotEnforced","conditions":{"users":{"includeUsers":["All"]},"platforms":{"includePlatforms":["all"],"excludePlatforms":["iOS"]}}}"#,
    );
    assert!(s.blocked_now().is_empty());
    // Enabled: Windows devices past grace are blocked from now on; iOS is excluded.
    let enabled_at = s.now();
    s.patch_ca(&ca, r#"{"state":"enabled"}"#);
    let mut blocked = s.blocked_now();
    blocked.sort();
    let mut expected: Vec<u64> = windows_failing.iter().map(device_number).collect();
    expected.sort();
    assert_eq!(blocked, expected);
    let (_, blocks) = s.control("GET", "/_emulator/blocks", "");
    assert!(
        blocks["value"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| time(&b["from"]) == enabled_at)
    );
    let state = s.control("GET", "/_emulator/state", "").1;
    assert_eq!(
        state["policies"][0]["deviceStatuses"]["blocked"],
        expected.len()
    );
    assert_eq!(state["policies"][1]["deviceStatuses"]["blocked"], 0);
    // Excluding a user by id unblocks that user's device.
    let spared = &windows_failing[0];
    s.patch_ca(
        &ca,
        &format!(
            r#"{{"conditions":{{"users":{{"excludeUsers":["{}"]}}}}}}"#,
            row_user(spared)
        ),
    );
    assert!(!s.blocked_now().contains(&device_number(spared)));
    assert_eq!(s.blocked_now().len(), expected.len() - 1);
    // With OR and MFA, users can satisfy MFA instead: nobody is blocked.
    s.patch_ca(
        &ca,
        r#"{"grantControls":{"operator":"OR","builtInControls":["mfa","compliantDevice"]}}"#,
    );
    assert!(s.blocked_now().is_empty());
    // AND makes compliance mandatory again; now every platform.
    s.patch_ca(
        &ca,
        r#"{"grantControls":{"operator":"AND"},"conditions":{"platforms":null}}"#,
    );
    assert_eq!(
        s.blocked_now().len(),
        windows_failing.len() + ios_failing.len() - 1
    );
}

#[test]
fn multi_admin_approval_turns_writes_into_requests_another_admin_approves() {
    let mut s = Session::new(Setup {
        maa: true,
        ..Setup::default()
    });
    let policy = s.policy(Platform::Windows);
    let pilot = s.group("Pilot IT");
    let url = format!("/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/assign");
    let assign = format!(
        r##"{{"assignments":[{{"target":{{"@odata.type":"#microsoft.graph.groupAssignmentTarget","groupId":"{pilot}"}}}}]}}"##
    );
    // Without a justification: refused.
    let refused = s.send("POST", &url, &assign, &[]);
    assert_eq!(refused.status, 400);
    let message = intune_message(&body(&refused));
    assert!(message.starts_with('{'), "Intune's envelope: {message}");
    assert!(
        message.contains("Header 'x-msft-approval-justification' is required to request approval")
    );
    // Not Base64: refused.
    let not_base64 = s.send(
        "POST",
        &url,
        &assign,
        &[("x-msft-approval-justification", "pilot!")],
    );
    assert_eq!(not_base64.status, 400);
    // With a justification: a request, 403 with its code, nothing applied.
    let justification = approvals::encode_base64(b"Pilot of the Windows baseline");
    let asked = s.send(
        "POST",
        &url,
        &assign,
        &[("x-msft-approval-justification", &justification)],
    );
    assert_eq!(asked.status, 403);
    let code = header(&asked, "x-msft-approval-code").unwrap().to_string();
    let error = body(&asked);
    assert_eq!(error["error"]["code"], "ApprovalRequired");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with(&format!("x-msft-approval-code: {code}"))
    );
    assert!(s.tenant.ledger.is_empty());
    let assignments =
        format!("/v1.0/deviceManagement/deviceCompliancePolicies/{policy}/assignments");
    assert_eq!(
        s.get(&assignments)["value"],
        json!([]),
        "reads are not intercepted"
    );
    // The request as Graph shows it.
    let listed = s.get(&format!(
        "/beta/deviceManagement/operationApprovalRequests?$filter=requestId%20eq%20'{code}'"
    ));
    let request = &listed["value"][0];
    assert_eq!(
        request["@odata.type"],
        "#microsoft.graph.operationApprovalRequest"
    );
    assert_eq!(request["status"], "needsApproval");
    assert_eq!(
        request["requestJustification"],
        "Pilot of the Windows baseline"
    );
    assert_eq!(request["approvalJustification"], Value::Null);
    assert_eq!(request["requestor"]["application"]["id"], "app");
    assert_eq!(
        request["requiredOperationApprovalPolicyTypes"],
        json!(["deviceCompliancePolicy"])
    );
    assert_eq!(
        time(&request["expirationDateTime"]),
        time(&request["requestDateTime"]).plus(Duration::from_secs(30 * DAY))
    );
    let single = s.get(&format!(
        "/v1.0/deviceManagement/operationApprovalRequests/{code}"
    ));
    assert_eq!(single["id"], code);
    // Resubmitting before approval: still 403, with the code.
    let early = s.send("POST", &url, &assign, &[("x-msft-approval-code", &code)]);
    assert_eq!(early.status, 403);
    assert_eq!(header(&early, "x-msft-approval-code"), Some(code.as_str()));
    assert!(
        body(&early)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not approved yet")
    );
    let unknown = s.send("POST", &url, &assign, &[("x-msft-approval-code", "nope")]);
    assert_eq!(unknown.status, 400);
    assert!(intune_message(&body(&unknown)).contains("Invalid approval code"));
    // The app cannot approve; the second admin does, in the admin center.
    let (status, approved) = s.control(
        "POST",
        &format!("/_emulator/approvals/{code}/approve"),
        r#"{"justification":"CHG-42"}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(approved["status"], "approved");
    assert_eq!(approved["approver"]["user"]["displayName"], "Second Admin");
    assert_eq!(approved["approvalJustification"], "CHG-42");
    // A different body is not what was approved.
    let other = assign.replace(&pilot, &s.group("Finance"));
    let mismatch = s.send("POST", &url, &other, &[("x-msft-approval-code", &code)]);
    assert_eq!(mismatch.status, 400);
    assert!(intune_message(&body(&mismatch)).contains("does not match the approved request"));
    // The approved write is applied once, through the normal route.
    let applied = s.send("POST", &url, &assign, &[("x-msft-approval-code", &code)]);
    assert_eq!(applied.status, 200);
    assert_eq!(s.get(&assignments)["value"].as_array().unwrap().len(), 1);
    let (_, ledger) = s.control("GET", "/_emulator/ledger", "");
    let entries = ledger["value"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["approval"], code);
    assert_eq!(entries[0]["actor"], "app");
    let again = s.send("POST", &url, &assign, &[("x-msft-approval-code", &code)]);
    assert_eq!(again.status, 400);
    assert!(intune_message(&body(&again)).contains("completed"));
    assert_eq!(s.tenant.ledger.len(), 1);
    let (_, all) = s.control("GET", "/_emulator/approvals", "");
    assert_eq!(all["value"][0]["status"], "completed");
    assert_eq!(all["value"][0]["method"], "POST");
    assert_eq!(
        all["value"][0]["path"],
        format!("/deviceManagement/deviceCompliancePolicies/{policy}/assign")
    );
    // Rejected and expired requests cannot be used.
    let second = s.send(
        "POST",
        &url,
        &other,
        &[("x-msft-approval-justification", &justification)],
    );
    let second_code = header(&second, "x-msft-approval-code").unwrap().to_string();
    assert_ne!(second_code, code);
    s.control(
        "POST",
        &format!("/_emulator/approvals/{second_code}/reject"),
        "",
    );
    let rejected = s.send(
        "POST",
        &url,
        &other,
        &[("x-msft-approval-code", &second_code)],
    );
    assert_eq!(rejected.status, 400);
    assert!(intune_message(&body(&rejected)).contains("rejected"));
    let third = s.send(
        "POST",
        &url,
        &other,
        &[("x-msft-approval-justification", &justification)],
    );
    let third_code = header(&third, "x-msft-approval-code").unwrap().to_string();
    s.advance(31 * DAY);
    let (status, _) = s.control(
        "POST",
        &format!("/_emulator/approvals/{third_code}/approve"),
        "",
    );
    assert_eq!(status, 409, "an expired request cannot be approved");
    let expired = s.send(
        "POST",
        &url,
        &other,
        &[("x-msft-approval-code", &third_code)],
    );
    assert!(intune_message(&body(&expired)).contains("expired"));
    // Conditional Access is not covered by Intune's approval.
    let ca = s.ca_id();
    s.patch_ca(&ca, r#"{"state":"enabledForReportingButNotEnforced"}"#);
}

#[test]
fn another_admin_acts_without_token_faults_or_approval_and_the_ledger_names_actors() {
    let mut settings = settings();
    settings.faults = 1.0;
    settings.token_lifetime = Duration::from_secs(400 * DAY);
    let mut s = Session::with(
        settings,
        Setup {
            maa: true,
            ..Setup::default()
        },
    );
    let ca = guid(7, "ca", CA_POLICY_NAME);
    let windows = guid(7, "policy", Platform::Windows);
    let admin = |s: &mut Session, body: Value| {
        let (status, answer) = s.control("POST", "/_emulator/as-admin", &body.to_string());
        assert_eq!(status, 200);
        answer
    };
    let patched = admin(
        &mut s,
        json!({"method": "PATCH", "path": format!("/identity/conditionalAccess/policies/{ca}"), "body": {"state": "enabled"}}),
    );
    assert_eq!(patched, json!({"status": 204, "body": null}));
    let read = admin(
        &mut s,
        json!({"method": "GET", "path": format!("/identity/conditionalAccess/policies/{ca}")}),
    );
    assert_eq!(read["status"], 200);
    assert_eq!(read["body"]["state"], "enabled");
    // No Multi Admin Approval for the admin, and the admin center's beta shapes.
    let assigned = admin(
        &mut s,
        json!({"method": "POST", "path": format!("/deviceManagement/deviceCompliancePolicies/{windows}/assign"), "body": {"assignments": [{"target": {"@odata.type": "#microsoft.graph.allDevicesAssignmentTarget"}}]}}),
    );
    assert_eq!(assigned["status"], 200);
    assert_eq!(assigned["body"]["value"][0]["source"], "direct");
    // The app meets the injected faults; the admin never does.
    let faulted = s.send("GET", "/v1.0/groups", "", &[]);
    assert!(faulted.status != 200 || faulted.delay.is_some() || faulted.drop_connection);
    assert_eq!(s.tenant.faults_injected, 1);
    let (_, ledger) = s.control("GET", "/_emulator/ledger", "");
    let actors: Vec<&str> = ledger["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors, ["admin", "admin"]);
    // An app write is the app's.
    let mut calm = Session::new(Setup::default());
    let id = calm.ca_id();
    calm.patch_ca(&id, r#"{"state":"enabled"}"#);
    calm.control(
        "POST",
        "/_emulator/as-admin",
        &json!({"method": "PATCH", "path": format!("/v1.0/identity/conditionalAccess/policies/{id}"), "body": {"state": "disabled"}}).to_string(),
    );
    let (_, ledger) = calm.control("GET", "/_emulator/ledger", "");
    let actors: Vec<&str> = ledger["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors, ["app", "admin"]);
}

#[test]
fn the_lived_in_tenant_has_what_other_administrators_configured() {
    let mut settings = settings();
    settings.devices = 5_000;
    settings.token_lifetime = Duration::from_secs(400 * DAY);
    let mut s = Session::with(
        settings,
        Setup {
            scenario: Scenario::LivedIn,
            ..Setup::default()
        },
    );
    let kiosk = s.group(KIOSK_GROUP);
    let helpdesk = s.group(HELPDESK_GROUP);
    let pilot = s.group("Pilot IT");
    let bg = s.group("Break Glass");
    let mut members = request(
        "GET",
        &format!("/v1.0/groups/{kiosk}/transitiveMembers/microsoft.graph.user?$count=true"),
        "",
        Some(&s.token),
    );
    members
        .headers
        .insert("consistencylevel".into(), "eventual".into());
    assert_eq!(body(&s.tenant.handle(&members))["@odata.count"], 0);
    let mut break_glass = request(
        "GET",
        &format!("/v1.0/groups/{bg}/transitiveMembers/microsoft.graph.user?$count=true"),
        "",
        Some(&s.token),
    );
    break_glass
        .headers
        .insert("consistencylevel".into(), "eventual".into());
    let break_glass_ids: Vec<Value> = body(&s.tenant.handle(&break_glass))["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].clone())
        .collect();
    assert_eq!(break_glass_ids.len(), 2);
    let templates = s.get("/v1.0/deviceManagement/notificationMessageTemplates");
    let reminder = templates["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["displayName"] == HELPDESK_TEMPLATE_NAME)
        .expect("the helpdesk reminder template")["id"]
        .clone();
    // Conditional Access, as Microsoft's templates configure it.
    let policies = s.get("/v1.0/identity/conditionalAccess/policies")["value"].clone();
    assert_eq!(policies.as_array().unwrap().len(), 2);
    let ca = &policies[0];
    assert_eq!(ca["displayName"], CA_POLICY_NAME);
    assert_eq!(ca["state"], "enabled");
    assert_eq!(
        ca["description"],
        "Baseline: compliant devices for Office 365 (owned by the identity team)"
    );
    let users = &ca["conditions"]["users"];
    assert_eq!(users["includeUsers"], json!(["All"]));
    assert_eq!(users["excludeUsers"], Value::Array(break_glass_ids.clone()));
    assert_eq!(users["excludeGroups"], json!([bg]));
    assert_eq!(
        users["excludeRoles"],
        json!(["d29b2b05-8046-44ba-8758-1e26182fcf32"])
    );
    assert_eq!(
        users["excludeGuestsOrExternalUsers"]["externalTenants"]["membershipKind"],
        "all"
    );
    assert!(
        users["excludeGuestsOrExternalUsers"]["guestOrExternalUserTypes"]
            .as_str()
            .unwrap()
            .contains("b2bDirectConnectUser")
    );
    let conditions = &ca["conditions"];
    assert_eq!(
        conditions["applications"]["includeApplications"],
        json!(["Office365"])
    );
    assert_eq!(conditions["applications"]["excludeApplications"], json!([]));
    assert_eq!(conditions["clientAppTypes"], json!(["all"]));
    assert_eq!(
        conditions["platforms"],
        json!({"includePlatforms": ["all"], "excludePlatforms": ["linux"]})
    );
    assert_eq!(
        conditions["locations"],
        json!({"includeLocations": ["All"], "excludeLocations": ["AllTrusted"]})
    );
    let grant = &ca["grantControls"];
    assert_eq!(grant["operator"], "AND");
    assert_eq!(grant["builtInControls"], json!(["compliantDevice"]));
    assert_eq!(
        grant["authenticationStrength"]["displayName"],
        "Multifactor authentication"
    );
    let session = &ca["sessionControls"];
    assert_eq!(session["signInFrequency"]["value"], 12);
    assert_eq!(session["signInFrequency"]["frequencyInterval"], "timeBased");
    assert_eq!(session["persistentBrowser"]["mode"], "never");
    let mfa = &policies[1];
    assert_eq!(mfa["displayName"], MFA_POLICY_NAME);
    assert_eq!(mfa["state"], "enabled");
    assert_eq!(
        mfa["conditions"]["users"]["includeRoles"],
        json!(["62e90394-69f5-4237-9190-012177145e10"])
    );
    assert_eq!(
        mfa["conditions"]["users"]["excludeUsers"],
        Value::Array(break_glass_ids)
    );
    assert_eq!(mfa["grantControls"]["builtInControls"], json!(["mfa"]));
    // Compliance policies with the admins' assignments and actions.
    let expand =
        "?$expand=assignments,scheduledActionsForRule($expand=scheduledActionConfigurations)";
    let windows_id = s.policy(Platform::Windows);
    let windows = s.get(&format!(
        "/beta/deviceManagement/deviceCompliancePolicies/{windows_id}{expand}"
    ));
    assert_eq!(
        windows["description"],
        "Windows baseline v3 (endpoint team)"
    );
    let targets: Vec<Value> = windows["assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["target"].clone())
        .collect();
    assert_eq!(targets.len(), 2);
    assert_eq!(targets[0]["groupId"], pilot);
    assert_eq!(
        targets[0]["deviceAndAppManagementAssignmentFilterType"],
        "include"
    );
    let filter = targets[0]["deviceAndAppManagementAssignmentFilterId"]
        .as_str()
        .unwrap();
    assert!(crate::graph::is_guid(filter));
    assert_eq!(
        targets[1]["@odata.type"],
        "#microsoft.graph.exclusionGroupAssignmentTarget"
    );
    assert_eq!(targets[1]["groupId"], kiosk);
    let actions = windows["scheduledActionsForRule"][0]["scheduledActionConfigurations"].clone();
    let summary: Vec<(Value, Value, Value, Value)> = actions
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["actionType"].clone(),
                a["gracePeriodHours"].clone(),
                a["notificationTemplateId"].clone(),
                a["notificationMessageCCList"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (json!("block"), json!(2160), json!(NIL_GUID), json!([])),
            (
                json!("notification"),
                json!(72),
                reminder.clone(),
                json!([helpdesk])
            ),
            (
                json!("pushNotification"),
                json!(24),
                json!(NIL_GUID),
                json!([])
            ),
        ]
    );
    let v1 = s.get(&format!(
        "/v1.0/deviceManagement/deviceCompliancePolicies/{windows_id}/assignments"
    ));
    assert!(
        v1["value"][0]["target"]
            .get("deviceAndAppManagementAssignmentFilterId")
            .is_none()
    );
    let ios_id = s.policy(Platform::Ios);
    let ios = s.get(&format!(
        "/v1.0/deviceManagement/deviceCompliancePolicies/{ios_id}{expand}"
    ));
    assert_eq!(
        ios["assignments"],
        json!([{"id": format!("{ios_id}_{kiosk}"), "target": {"@odata.type": "#microsoft.graph.exclusionGroupAssignmentTarget", "groupId": kiosk}}])
    );
    let ios_actions = &ios["scheduledActionsForRule"][0]["scheduledActionConfigurations"];
    assert_eq!(ios_actions[0]["actionType"], "block");
    assert_eq!(ios_actions[0]["gracePeriodHours"], 0);
    assert_eq!(ios_actions[1]["actionType"], "notification");
    assert_eq!(ios_actions[1]["gracePeriodHours"], 0);
    assert_eq!(ios_actions[1]["notificationTemplateId"], reminder);
    for platform in [Platform::Android, Platform::Macos] {
        let id = s.policy(platform);
        let p = s.get(&format!(
            "/v1.0/deviceManagement/deviceCompliancePolicies/{id}{expand}"
        ));
        assert_eq!(p["assignments"], json!([]));
        let only = &p["scheduledActionsForRule"][0]["scheduledActionConfigurations"];
        assert_eq!(only.as_array().unwrap().len(), 1);
        assert_eq!(only[0]["gracePeriodHours"], 0);
    }
    // It has been running: the pilot's Windows devices have reported; failing ones are still in
    // the pilot's long grace, so nobody is blocked yet.
    let rows = s.rows(&windows_id);
    assert!(!rows.is_empty());
    let epoch = s.now();
    assert!(
        rows.iter()
            .any(|r| r["status"] == "compliant" && time(&r["lastReportedDateTime"]) <= epoch)
    );
    assert!(rows.iter().any(|r| r["status"] == "nonCompliant"
        && time(&r["complianceGracePeriodExpirationDateTime"]) > epoch));
    let blocks = s.control("GET", "/_emulator/blocks", "").1;
    assert!(blocks["value"].as_array().unwrap().is_empty());
    let (_, state) = s.control("GET", "/_emulator/state", "");
    assert_eq!(state["scenario"], "lived-in");
    assert_eq!(state["assignmentFilters"][0]["id"], filter);
    // --ca-state overrides the policy's state.
    let mut report_only = Session::new(Setup {
        scenario: Scenario::LivedIn,
        ca_state: Some(CaState::ReportOnly),
        ..Setup::default()
    });
    let policies = report_only.get("/v1.0/identity/conditionalAccess/policies");
    assert_eq!(
        policies["value"][0]["state"],
        "enabledForReportingButNotEnforced"
    );
    assert_eq!(policies["value"][1]["state"], "enabled");
    assert!(report_only.blocked_now().is_empty());
}

#[test]
fn the_default_tenant_follows_the_ca_state_flag() {
    let default = Session::new(Setup::default());
    assert_eq!(default.tenant.ca_policies[0].raw["state"], "disabled");
    assert_eq!(default.tenant.ca_policies.len(), 1);
    let enabled = Session::new(Setup {
        ca_state: Some(CaState::Enabled),
        ..Setup::default()
    });
    assert_eq!(enabled.tenant.ca_policies[0].raw["state"], "enabled");
    assert_eq!("lived-in".parse::<Scenario>(), Ok(Scenario::LivedIn));
    assert_eq!("report-only".parse::<CaState>(), Ok(CaState::ReportOnly));
    assert!("sometimes".parse::<CaState>().is_err());
}

#[test]
fn percent_decoding_keeps_what_is_not_an_escape() {
    assert_eq!(percent_decode("a%20b"), "a b");
    assert_eq!(percent_decode("%a\u{e9}"), "%a\u{e9}");
    assert_eq!(percent_decode("100%"), "100%");
    assert_eq!(percent_decode("%4"), "%4");
    assert_eq!(percent_decode("%zz%41"), "%zzA");
    assert_eq!(percent_decode("%C3%A9"), "\u{e9}");
}

fn unready() -> Setup {
    Setup {
        readiness: Readiness {
            variant: ReadinessVariant::Unready,
            domains: vec!["contoso.com".into()],
            ..Readiness::default()
        },
        ..Setup::default()
    }
}

#[test]
fn tokens_carry_the_granted_roles() {
    let ready = Session::new(Setup::default());
    let roles = crate::provider::graph::client::token_roles(&ready.token).unwrap();
    assert_eq!(roles.len(), ALL_ROLES.len());
    let unready = Session::new(unready());
    let roles = crate::provider::graph::client::token_roles(&unready.token).unwrap();
    assert!(
        !roles
            .iter()
            .any(|r| r == "Policy.ReadWrite.ConditionalAccess")
    );
    assert!(roles.iter().any(|r| r == "Policy.Read.All"));
}

#[test]
fn the_ready_tenant_is_set_up_as_microsoft_asks() {
    let mut s = Session::new(Setup::default());
    let org = s.get("/v1.0/organization");
    let domains = org["value"][0]["verifiedDomains"].as_array().unwrap();
    assert_eq!(domains.len(), 1);
    assert_eq!(domains[0]["isInitial"], true);
    let apns = s.get("/v1.0/deviceManagement/applePushNotificationCertificate");
    let expires = crate::graph::parse_time(apns["expirationDateTime"].as_str().unwrap()).unwrap();
    assert!(expires > s.tenant.now().plus(Duration::from_secs(300 * DAY)));
    let dm = s.get("/v1.0/deviceManagement?$select=settings");
    assert_eq!(dm["settings"]["secureByDefault"], true);
    assert!(dm.get("id").is_none(), "{dm}");
    let template = guid(7, "template", TEMPLATE_NAME);
    let messages = s.get(&format!(
        "/v1.0/deviceManagement/notificationMessageTemplates/{template}/localizedNotificationMessages"
    ));
    assert_eq!(messages["value"][0]["locale"], "en-us");
    assert_eq!(messages["value"][0]["isDefault"], true);
}

#[test]
fn the_unready_tenant_seeds_one_of_each_mistake() {
    let mut s = Session::new(unready());
    let org = s.get("/v1.0/organization");
    assert_eq!(org["value"][0]["verifiedDomains"][1]["name"], "contoso.com");
    let apns = s.get("/v1.0/deviceManagement/applePushNotificationCertificate");
    let expires = crate::graph::parse_time(apns["expirationDateTime"].as_str().unwrap()).unwrap();
    assert!(expires < s.tenant.now());
    let policy = s.policy(Platform::Ios);
    let read = s.get(&format!(
        "/v1.0/deviceManagement/deviceCompliancePolicies/{policy}?$expand=scheduledActionsForRule($expand=scheduledActionConfigurations)"
    ));
    let actions = read["scheduledActionsForRule"][0]["scheduledActionConfigurations"]
        .as_array()
        .unwrap();
    assert!(
        actions
            .iter()
            .any(|a| a["actionType"] == "wipe" && a["gracePeriodHours"] == UNREADY_WIPE_HOURS)
    );
    let template = guid(7, "template", TEMPLATE_NAME);
    let messages = s.get(&format!(
        "/v1.0/deviceManagement/notificationMessageTemplates/{template}/localizedNotificationMessages"
    ));
    assert_eq!(messages["value"][0]["locale"], "de-de");
    let dm = s.get("/v1.0/deviceManagement?$select=settings");
    assert_eq!(dm["settings"]["secureByDefault"], false);
}

#[test]
fn a_tenant_without_a_push_certificate_answers_404() {
    let mut s = Session::new(Setup {
        readiness: Readiness {
            apns: Apns::Absent,
            ..Readiness::default()
        },
        ..Setup::default()
    });
    let (status, _) = s.call(
        "GET",
        "/v1.0/deviceManagement/applePushNotificationCertificate",
        "",
    );
    assert_eq!(status, 404);
    assert_eq!(Apns::parse("none"), Ok(Apns::Absent));
    assert_eq!(
        Apns::parse("-2d"),
        Ok(Apns::At(
            SIMULATED_EPOCH.minus(Duration::from_secs(2 * DAY))
        ))
    );
    assert!(Apns::parse("soon").is_err());
}

fn sign_ins(tenant: &mut Tenant, token: &str, url: &str, prefer: bool) -> Response {
    let mut req = request("GET", url, "", Some(token));
    if prefer {
        req.headers
            .insert("prefer".into(), "include-unknown-enum-members".into());
    }
    tenant.handle(&req)
}

#[test]
fn sign_ins_are_judged_when_they_happen_listed_newest_first_paged_and_throttled() {
    let (mut tenant, token) = signed_in();
    let ca = body(&tenant.handle(&request(
        "GET",
        "/v1.0/identity/conditionalAccess/policies",
        "",
        Some(&token),
    )))["value"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Report-only over everyone: with no compliance policy assigned and the tenant marking
    // such devices not compliant, every evaluated sign-in would fail.
    let patched = tenant.handle(&request(
        "PATCH",
        &format!("/v1.0/identity/conditionalAccess/policies/{ca}"),
        r#"{"state":"enabledForReportingButNotEnforced","conditions":{"users":{"includeUsers":["All"]}}}"#,
        Some(&token),
    ));
    assert_eq!(patched.status, 204);
    let burst = tenant.handle(&request(
        "POST",
        "/_emulator/signins",
        r#"{"count": 400}"#,
        None,
    ));
    assert_eq!(burst.status, 200, "{}", body(&burst));
    assert_eq!(body(&burst)["results"]["reportOnlyFailure"], 400);
    // Changing the policy afterwards does not rewrite the log.
    let disabled = tenant.handle(&request(
        "PATCH",
        &format!("/v1.0/identity/conditionalAccess/policies/{ca}"),
        r#"{"state":"disabled"}"#,
        Some(&token),
    ));
    assert_eq!(disabled.status, 204);
    tenant.handle(&request(
        "POST",
        "/_emulator/signins",
        r#"{"count": 1}"#,
        None,
    ));
    let mut url = "/v1.0/auditLogs/signIns?$top=150".to_string();
    let mut seen = Vec::new();
    let mut results = std::collections::BTreeMap::<String, u64>::new();
    for _ in 0..5 {
        let page = sign_ins(&mut tenant, &token, &url, true);
        assert_eq!(page.status, 200, "{}", body(&page));
        let page = body(&page);
        for s in page["value"].as_array().unwrap() {
            seen.push(s["id"].as_str().unwrap().to_string());
            let applied = &s["appliedConditionalAccessPolicies"][0];
            assert_eq!(applied["id"], ca.as_str());
            *results
                .entry(applied["result"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        match page["@odata.nextLink"].as_str() {
            Some(next) => url = next.trim_start_matches("http://localhost").to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 401);
    let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 401);
    assert_eq!(results["reportOnlyFailure"], 400);
    // The newest first: the last sign-in, after the policy was disabled.
    assert_eq!(results["notEnabled"], 1);
    // Three pages so far; the fourth request, without `Prefer`, gets the report-only results as
    // an unknown future value; the fifth is served, the sixth in ten seconds throttled.
    let plain = body(&sign_ins(
        &mut tenant,
        &token,
        "/v1.0/auditLogs/signIns?$top=2&$filter=createdDateTime%20ge%202020-01-01T00:00:00Z",
        false,
    ));
    assert_eq!(
        plain["value"][1]["appliedConditionalAccessPolicies"][0]["result"],
        "unknownFutureValue"
    );
    let fifth = sign_ins(&mut tenant, &token, "/v1.0/auditLogs/signIns", true);
    assert_eq!(fifth.status, 200);
    let throttled = sign_ins(&mut tenant, &token, "/v1.0/auditLogs/signIns", true);
    assert_eq!(throttled.status, 429);
    assert!(header(&throttled, "retry-after").is_some());
}

#[test]
fn the_sign_in_log_needs_its_permission_and_a_supported_filter() {
    let readiness = Readiness {
        roles: Some(vec!["Policy.Read.All".into()]),
        ..Readiness::default()
    };
    let mut tenant = Tenant::with_setup(
        settings(),
        Setup {
            readiness,
            ..Setup::default()
        },
    );
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
    let denied = sign_ins(&mut tenant, &token, "/v1.0/auditLogs/signIns", true);
    assert_eq!(denied.status, 403);
    assert_eq!(
        body(&denied)["error"]["code"],
        "Authorization_RequestDenied"
    );
    let (mut tenant, token) = signed_in();
    let bad = sign_ins(
        &mut tenant,
        &token,
        "/v1.0/auditLogs/signIns?$filter=userId%20eq%20'x'",
        true,
    );
    assert_eq!(bad.status, 400);
    let too_big = sign_ins(
        &mut tenant,
        &token,
        "/v1.0/auditLogs/signIns?$top=1001",
        true,
    );
    assert_eq!(too_big.status, 400);
    for bad_burst in [
        r#"{"count": 0}"#,
        r#"{"count": 100001}"#,
        r#"{"count": 1, "group": "Nope"}"#,
        "x",
    ] {
        let answer = tenant.handle(&request("POST", "/_emulator/signins", bad_burst, None));
        assert!(answer.status >= 400, "{bad_burst}");
    }
}

#[test]
fn an_export_job_completes_in_tenant_time_and_its_blob_takes_a_signature_never_a_token() {
    let mut s = Session::new(Setup::default());
    let policy = s.policy(Platform::Windows);
    let ask = json!({
        "reportName": "DeviceStatusByCompliacePolicyReport",
        "filter": format!("(PolicyId eq '{policy}')"),
        "select": ["DeviceId", "UserId", "PolicyStatus", "LastContact"],
        "format": "csv",
    })
    .to_string();
    let (status, job) = s.call("POST", "/v1.0/deviceManagement/reports/exportJobs", &ask);
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["status"], "notStarted");
    assert_eq!(job["url"], Value::Null);
    let id = job["id"].as_str().unwrap().to_string();
    let url = format!("/v1.0/deviceManagement/reports/exportJobs('{id}')");
    s.advance(10);
    assert_eq!(s.get(&url)["status"], "inProgress");
    s.advance(600);
    let done = s.get(&url);
    assert_eq!(done["status"], "completed", "{done}");
    let link = done["url"].as_str().unwrap();
    let rest = link.split_once("/reports/").unwrap().1;
    let (name, query) = rest.split_once('?').unwrap();
    let query = parse_query(query);
    let refused = |r: Result<axum::body::Bytes, (u16, String)>| r.err().map(|(status, _)| status);
    // A bearer token beside the signature is refused, as a wrong signature is.
    assert_eq!(refused(s.tenant.blob(name, &query, true)), Some(403));
    let forged: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                if k == "sig" {
                    "0".repeat(32)
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    assert_eq!(refused(s.tenant.blob(name, &forged, false)), Some(403));
    let zip = s.tenant.blob(name, &query, false).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip.to_vec())).unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut archive.by_index(0).unwrap(), &mut text).unwrap();
    assert!(
        text.starts_with("DeviceId,UserId,PolicyStatus,PolicyStatus_loc,LastContact\n"),
        "{text}"
    );
    // The export API's 48 requests per app per minute, then 429 with Retry-After.
    let throttled = (0..60)
        .map(|_| s.send("GET", &url, "", &[]))
        .find(|r| r.status == 429)
        .expect("throttled within a minute's worth");
    assert!(throttled.headers.iter().any(|(k, _)| k == "Retry-After"));
    // Expired after six hours.
    s.advance(7 * HOUR);
    assert_eq!(refused(s.tenant.blob(name, &query, false)), Some(403));
}

#[test]
fn members_carry_their_mail_as_selected_and_null_without_a_mailbox() {
    let (mut tenant, token) = signed_in();
    let groups = body(&tenant.handle(&request(
        "GET",
        "/v1.0/groups?$filter=displayName%20eq%20'Sales'",
        "",
        Some(&token),
    )));
    let all = groups["value"][0]["id"].as_str().unwrap().to_string();
    let mut listing = request(
        "GET",
        &format!(
            "/v1.0/groups/{all}/transitiveMembers/microsoft.graph.user?$select=id,mail,userPrincipalName&$count=true&$top=999"
        ),
        "",
        Some(&token),
    );
    listing
        .headers
        .insert("consistencylevel".into(), "eventual".into());
    let page = body(&tenant.handle(&listing));
    let users = page["value"].as_array().unwrap();
    assert!(!users.is_empty());
    for user in users {
        let keys: Vec<&String> = user.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "mail", "userPrincipalName"], "{user}");
    }
    let with: Vec<&Value> = users.iter().filter(|u| u["mail"].is_string()).collect();
    assert!(with.iter().all(|u| u["mail"] == u["userPrincipalName"]));
    assert!(
        users.iter().any(|u| u["mail"].is_null()),
        "some users have no mailbox"
    );
    assert!(with.len() > users.len() * 9 / 10);
    // `accountEnabled` only when selected, false for a few who left.
    let mut listing = request(
        "GET",
        &format!(
            "/v1.0/groups/{all}/transitiveMembers/microsoft.graph.user?$select=id,mail,userPrincipalName,accountEnabled&$count=true&$top=999"
        ),
        "",
        Some(&token),
    );
    listing
        .headers
        .insert("consistencylevel".into(), "eventual".into());
    let page = body(&tenant.handle(&listing));
    let users = page["value"].as_array().unwrap();
    assert!(
        users.iter().all(|u| u["accountEnabled"].is_boolean()),
        "{page}"
    );
    for user in users {
        let n: usize = user["userPrincipalName"].as_str().unwrap()[4..]
            .split('@')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            user["accountEnabled"],
            tenant.fleet.account_enabled(n),
            "{user}"
        );
    }
}
