//! Least privilege, proven: Kubernetes RBAC evaluated the way the API server
//! does, on the requests the emulator recorded, against the rules the Helm
//! chart renders for a component's ServiceAccount.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

/// One request as the emulator logged it.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Request {
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub query: String,
    #[serde(default)]
    pub agent: String,
}

/// Every request in the emulator's log.
pub fn requests(log: &Path) -> Vec<Request> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// What RBAC decides on: the request's verb and resource.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// `resource` or `resource/subresource`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The resource attributes of a request; `None` for non-resource URLs
/// (discovery: `/api`, `/apis/...` group lists, `/version`), which every
/// authenticated user may read.
pub fn attributes(r: &Request) -> Option<Attributes> {
    let parts: Vec<&str> = r.path.split('/').filter(|p| !p.is_empty()).collect();
    let (group, rest) = match parts.first() {
        Some(&"api") => ("", parts.get(1..)?),
        Some(&"apis") => (*parts.get(1)?, parts.get(2..)?),
        _ => return None,
    };
    // version, [namespaces, ns], resource, [name, [subresource]]
    let mut rest = rest.get(1..)?;
    let mut namespace = None;
    if rest.len() > 2 && rest[0] == "namespaces" {
        namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    let resource = rest.first()?;
    let name = rest.get(1).map(|s| s.to_string());
    let sub = rest.get(2);
    let watch = r
        .query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1");
    let verb = match (r.method.as_str(), &name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        _ => return None,
    };
    Some(Attributes {
        verb: verb.into(),
        group: group.into(),
        resource: match sub {
            Some(s) => format!("{resource}/{s}"),
            None => resource.to_string(),
        },
        namespace,
        name,
    })
}

/// One rule of a (Cluster)Role bound to the component, with where it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
    /// `None`: cluster-wide (a ClusterRole bound by a ClusterRoleBinding).
    pub namespace: Option<String>,
    /// Where it comes from, for messages.
    pub source: String,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The rules that the rendered manifests grant ServiceAccount
/// `namespace/account`.
pub fn rules_for(docs: &[Value], account: &str, namespace: &str) -> Vec<Rule> {
    let mut out = Vec::new();
    for binding in docs.iter().filter(|d| {
        matches!(
            d["kind"].as_str(),
            Some("ClusterRoleBinding" | "RoleBinding")
        )
    }) {
        let binds_us = binding["subjects"].as_array().is_some_and(|s| {
            s.iter().any(|x| {
                x["kind"] == "ServiceAccount" && x["name"] == account && x["namespace"] == namespace
            })
        });
        if !binds_us {
            continue;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let scope = match binding["kind"].as_str() {
            Some("RoleBinding") => binding["metadata"]["namespace"]
                .as_str()
                .map(str::to_string),
            _ => None,
        };
        let Some(role) = docs.iter().find(|d| {
            d["kind"] == role_kind
                && d["metadata"]["name"] == role_name
                && (role_kind == "ClusterRole"
                    || d["metadata"]["namespace"].as_str() == scope.as_deref())
        }) else {
            continue;
        };
        for rule in role["rules"].as_array().into_iter().flatten() {
            out.push(Rule {
                api_groups: strings(&rule["apiGroups"]),
                resources: strings(&rule["resources"]),
                verbs: strings(&rule["verbs"]),
                resource_names: strings(&rule["resourceNames"]),
                namespace: scope.clone(),
                source: format!("{role_kind}/{role_name}"),
            });
        }
    }
    out
}

impl Rule {
    /// Does this rule allow `a`?
    pub fn allows(&self, a: &Attributes) -> bool {
        let any = |list: &[String], x: &str| list.iter().any(|v| v == "*" || v == x);
        if let Some(ns) = &self.namespace
            && a.namespace.as_deref() != Some(ns.as_str())
        {
            return false;
        }
        if !any(&self.api_groups, &a.group)
            || !any(&self.resources, &a.resource)
            || !any(&self.verbs, &a.verb)
        {
            return false;
        }
        self.resource_names.is_empty()
            || a.name
                .as_deref()
                .is_some_and(|n| self.resource_names.iter().any(|r| r == n))
    }

    /// Every (group, resource, verb) this rule grants.
    pub fn grants(&self) -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for g in &self.api_groups {
            for r in &self.resources {
                for v in &self.verbs {
                    out.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
        out
    }
}

/// What a set of requests shows about a set of rules: the requests no rule
/// allows, and the grants no request used.
#[derive(Debug, Default)]
pub struct Verdict {
    pub denied: Vec<Attributes>,
    pub unused: Vec<(String, String, String, String)>,
}

pub fn judge(rules: &[Rule], requests: &[Attributes]) -> Verdict {
    let mut used: BTreeSet<(usize, String, String, String)> = BTreeSet::new();
    let mut denied = BTreeSet::new();
    for a in requests {
        let mut allowed = false;
        for (i, r) in rules.iter().enumerate() {
            if r.allows(a) {
                allowed = true;
                used.insert((i, a.group.clone(), a.resource.clone(), a.verb.clone()));
            }
        }
        if !allowed {
            denied.insert(a.clone());
        }
    }
    let mut unused = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for (g, res, v) in r.grants() {
            if !used.contains(&(i, g.clone(), res.clone(), v.clone())) {
                unused.push((r.source.clone(), g, res, v));
            }
        }
    }
    Verdict {
        denied: denied.into_iter().collect(),
        unused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, query: &str) -> Attributes {
        attributes(&Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            agent: String::new(),
        })
        .expect("a resource request")
    }

    #[test]
    fn requests_become_rbac_attributes() {
        let a = req(
            "GET",
            "/apis/stowage.dev/v1alpha1/namespaces/t/uploadjobs",
            "watch=true&resourceVersion=3",
        );
        assert_eq!(
            (a.verb.as_str(), a.group.as_str(), a.resource.as_str()),
            ("watch", "stowage.dev", "uploadjobs")
        );
        let a = req(
            "PATCH",
            "/apis/stowage.dev/v1alpha1/namespaces/t/uploadjobs/docs/status",
            "",
        );
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str(), a.name.as_deref()),
            ("patch", "uploadjobs/status", Some("docs"))
        );
        let a = req("GET", "/apis/apps/v1/namespaces/t/deployments/w/scale", "");
        assert_eq!(
            (a.verb.as_str(), a.resource.as_str()),
            ("get", "deployments/scale")
        );
        let a = req("POST", "/api/v1/namespaces/t/events", "");
        assert_eq!(
            (a.verb.as_str(), a.group.as_str(), a.resource.as_str()),
            ("create", "", "events")
        );
        assert!(
            attributes(&Request {
                method: "GET".into(),
                path: "/apis".into(),
                query: String::new(),
                agent: String::new()
            })
            .is_none()
        );
    }

    #[test]
    fn rules_allow_by_group_resource_verb_name_and_namespace() {
        let rule = Rule {
            api_groups: vec!["apps".into()],
            resources: vec!["deployments/scale".into()],
            verbs: vec!["get".into(), "patch".into()],
            resource_names: vec!["w".into()],
            namespace: Some("t".into()),
            source: "Role/x".into(),
        };
        assert!(rule.allows(&req(
            "GET",
            "/apis/apps/v1/namespaces/t/deployments/w/scale",
            ""
        )));
        assert!(!rule.allows(&req(
            "GET",
            "/apis/apps/v1/namespaces/t/deployments/other/scale",
            ""
        )));
        assert!(!rule.allows(&req(
            "GET",
            "/apis/apps/v1/namespaces/u/deployments/w/scale",
            ""
        )));
        assert!(!rule.allows(&req(
            "PUT",
            "/apis/apps/v1/namespaces/t/deployments/w/scale",
            ""
        )));
        let v = judge(
            &[rule],
            &[req(
                "GET",
                "/apis/apps/v1/namespaces/t/deployments/w/scale",
                "",
            )],
        );
        assert!(v.denied.is_empty());
        assert_eq!(
            v.unused,
            vec![(
                "Role/x".to_string(),
                "apps".to_string(),
                "deployments/scale".to_string(),
                "patch".to_string()
            )]
        );
    }
}
