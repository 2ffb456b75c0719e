//! The directory's people for announcements and approver groups: a group's users, read
//! through `transitiveMembers` (nested groups flattened) with their e-mail addresses.
//!
//! `GET /groups/{id}/transitiveMembers/microsoft.graph.user?$select=id,mail,userPrincipalName,accountEnabled`
//! (Microsoft Graph, "List group transitive members",
//! https://learn.microsoft.com/graph/api/group-list-transitivemembers): the cast keeps users only
//! and needs `ConsistencyLevel: eventual` with `$count=true` (the page says both are required
//! with an OData cast); pages of at most 999 follow `@odata.nextLink`. `mail` is null for a user
//! without a mailbox: such a member is told nothing and named in the audit trail (the user
//! principal name is a sign-in name, not a mailbox, so it is no fallback). `accountEnabled` is
//! returned only when selected ("user resource type",
//! https://learn.microsoft.com/graph/api/resources/user); a disabled account is told nothing
//! either, and named. An app that may read group
//! members (`GroupMember.Read.All`) but not users gets each user with its id only and every other
//! property null ("Limited information returned for inaccessible member objects",
//! https://learn.microsoft.com/graph/permissions-overview): that is a directory phasegate cannot
//! read, not a group of people without addresses.

use std::collections::BTreeSet;

use serde_json::Value;

use super::GraphProvider;
use super::client::{GraphClient, encode};
use super::mapping::GroupRef;
use crate::domain::directory::Member;
use crate::domain::plan::PolicyTarget;
use crate::graph::ALL_USERS_NAME;
use crate::provider::{ErrorKind, ProviderError};

impl GraphProvider {
    /// The users of the group the plan names `group` (resolved as the plan's groups are), at
    /// most `limit` and one more.
    pub(super) async fn directory_members(
        &mut self,
        target: &PolicyTarget,
        group: &str,
        limit: usize,
    ) -> Result<Vec<Member>, ProviderError> {
        let wanted = BTreeSet::from([group.to_string()]);
        let names = self.resolve(target, &wanted, &[]).await?;
        let id = match names.groups.get(group) {
            Some(GroupRef::Id(id)) => id.clone(),
            Some(GroupRef::AllUsers) => {
                return Err(ProviderError::not_found(format!(
                    "`{ALL_USERS_NAME}` is Intune's virtual group, not a directory group whose \
                     members can be listed: name a directory group or an address"
                )));
            }
            None => {
                return Err(ProviderError::not_found(format!(
                    "group `{group}` not found in tenant {}",
                    self.tenant()
                )));
            }
        };
        group_users(&self.client, &id, group, limit).await
    }
}

/// The users of the directory group with object id `id` (the plan's `group`), with their
/// addresses and whether their account is enabled: at most `limit` and one more.
pub(crate) async fn group_users(
    client: &GraphClient,
    id: &str,
    group: &str,
    limit: usize,
) -> Result<Vec<Member>, ProviderError> {
    let url = format!(
        "/groups/{}/transitiveMembers/microsoft.graph.user?$select=id,mail,userPrincipalName,accountEnabled&$top=999&$count=true",
        encode(id)
    );
    let mut members = Vec::new();
    let mut limited = 0usize;
    let mut seen = 0usize;
    client
        .for_each_page(&url, &[("ConsistencyLevel", "eventual")], |page| {
            for user in page {
                seen += 1;
                if members.len() > limit {
                    continue;
                }
                match member(user) {
                    Some(m) => members.push(m),
                    None => limited += 1,
                }
            }
        })
        .await?;
    if limited > 0 && members.is_empty() {
        return Err(ProviderError::new(
            ErrorKind::Auth,
            format!(
                "the members of `{group}` came back without names or addresses (limited \
                 information): the app needs User.Read.All beside GroupMember.Read.All"
            ),
        ));
    }
    tracing::debug!(group, seen, kept = members.len(), "group members read");
    Ok(members)
}

/// One user of a `transitiveMembers` page; `None` for one shown with limited information.
fn member(user: &Value) -> Option<Member> {
    let id = user["id"].as_str()?.to_string();
    let name = user["userPrincipalName"].as_str()?.to_string();
    let mail = user["mail"]
        .as_str()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string);
    // Selected, so present for every user Graph shows in full; absent only in an answer that
    // left it out, which says nothing against the account.
    let enabled = user["accountEnabled"].as_bool().unwrap_or(true);
    Some(Member {
        id,
        name,
        mail,
        enabled,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_without_a_mailbox_has_no_address_and_one_shown_limited_is_not_a_member() {
        let with = serde_json::json!({"id": "1", "userPrincipalName": "a@contoso.com", "mail": "A@contoso.com"});
        let without =
            serde_json::json!({"id": "2", "userPrincipalName": "b@contoso.com", "mail": null});
        let limited = serde_json::json!({"@odata.type": "#microsoft.graph.user", "id": "3", "userPrincipalName": null, "mail": null});
        assert_eq!(
            member(&with).unwrap().mail.as_deref(),
            Some("A@contoso.com")
        );
        assert_eq!(member(&without).unwrap().mail, None);
        assert!(member(&with).unwrap().enabled);
        let disabled = serde_json::json!({"id": "4", "userPrincipalName": "d@contoso.com", "mail": "d@contoso.com", "accountEnabled": false});
        assert!(!member(&disabled).unwrap().enabled);
        assert_eq!(member(&limited), None);
        assert_eq!(member(&serde_json::json!("x")), None);
    }
}
