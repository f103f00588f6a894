//! Key scopes within a tenant (`keys.scopes`): conversations or workspaces whose events are encrypted under
//! data keys of their own, so that they can be shredded without touching the rest of the tenant.

use std::collections::HashMap;

use chatvault_core::config::KeyScopeConfig;

use super::DEFAULT_SCOPE;

/// Which key scope an event belongs to. A conversation's own scope wins over its workspace's; everything else
/// is in the tenant's default scope.
#[derive(Debug, Clone, Default)]
pub struct KeyScopes {
    /// Tenant → its scopes (looked up by `&str`, without allocating, for every archived event).
    by_tenant: HashMap<String, TenantScopes>,
}

#[derive(Debug, Clone, Default)]
struct TenantScopes {
    /// Conversation id → scope name.
    conversations: HashMap<String, String>,
    /// Workspace id → scope name.
    workspaces: HashMap<String, String>,
}

impl KeyScopes {
    /// From validated configuration (a conversation or workspace is in one scope only).
    pub fn from_config(scopes: &[KeyScopeConfig]) -> KeyScopes {
        let mut resolved = KeyScopes::default();
        for scope in scopes {
            let tenant = resolved.by_tenant.entry(scope.tenant.clone()).or_default();
            for conversation in &scope.conversations {
                tenant
                    .conversations
                    .insert(conversation.clone(), scope.name.clone());
            }
            for workspace in &scope.workspaces {
                tenant
                    .workspaces
                    .insert(workspace.clone(), scope.name.clone());
            }
        }
        resolved
    }

    /// The scope of an event of `tenant` in `conversation` of `workspace` ([`DEFAULT_SCOPE`] when none names
    /// it).
    pub fn scope_of(&self, tenant: &str, conversation: &str, workspace: &str) -> &str {
        let Some(scopes) = self.by_tenant.get(tenant) else {
            return DEFAULT_SCOPE;
        };
        scopes
            .conversations
            .get(conversation)
            .or_else(|| {
                (!workspace.is_empty())
                    .then(|| scopes.workspaces.get(workspace))
                    .flatten()
            })
            .map(String::as_str)
            .unwrap_or(DEFAULT_SCOPE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_scope_wins_over_its_workspace_and_tenants_are_apart() {
        let scopes = KeyScopes::from_config(&[
            KeyScopeConfig {
                tenant: "acme".into(),
                name: "legal".into(),
                conversations: vec!["C-legal".into()],
                workspaces: vec![],
            },
            KeyScopeConfig {
                tenant: "acme".into(),
                name: "hr".into(),
                conversations: vec![],
                workspaces: vec!["W-hr".into()],
            },
        ]);
        assert_eq!(scopes.scope_of("acme", "C-legal", "W-hr"), "legal");
        assert_eq!(scopes.scope_of("acme", "C-any", "W-hr"), "hr");
        assert_eq!(scopes.scope_of("acme", "C-any", ""), DEFAULT_SCOPE);
        assert_eq!(scopes.scope_of("globex", "C-legal", "W-hr"), DEFAULT_SCOPE);
        assert_eq!(
            KeyScopes::default().scope_of("acme", "C-legal", ""),
            DEFAULT_SCOPE
        );
    }
}
