//! The reconciler's errors: one variant per failing action, each with a static
//! [`Error::reason`] (event reason, condition reason and metric label) and a message that says
//! what is wrong and what to do.

use crate::build::InvalidSpec;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not match the EventConsumer schema (written around the CRD's
    /// validation, or by an incompatible version).
    #[error(
        "the EventConsumer cannot be read as sluice.dev/v1alpha1: {0}; fix it with kubectl edit so it matches the CRD (kubectl explain eventconsumer.spec)"
    )]
    InvalidObject(String),

    #[error("the spec cannot be realised: {0}")]
    InvalidSpec(#[from] InvalidSpec),

    #[error(
        "Secret {namespace}/{name}, referenced by {field}, does not exist; create it (or fix {field}); the operator retries as soon as it appears"
    )]
    SecretNotFound {
        namespace: String,
        name: String,
        field: &'static str,
    },

    #[error(
        "Secret {namespace}/{name} has no key {key:?}, referenced by {field}; add the key to the Secret or point {field} at the right key"
    )]
    SecretKeyMissing {
        namespace: String,
        name: String,
        key: String,
        field: &'static str,
    },

    #[error(
        "reading Secret {namespace}/{name} failed: {source}; check the operator's RBAC (get secrets) and the API server"
    )]
    GetSecret {
        namespace: String,
        name: String,
        source: kube::Error,
    },

    #[error(
        "creating or reading the drain-token Secret {namespace}/{name} failed: {source}; check the operator's RBAC (get/create secrets) and the API server"
    )]
    DrainToken {
        namespace: String,
        name: String,
        source: kube::Error,
    },

    #[error("applying ConfigMap {namespace}/{name} failed: {source}")]
    ApplyConfigMap {
        namespace: String,
        name: String,
        source: kube::Error,
    },

    #[error("applying Deployment {namespace}/{name} failed: {source}")]
    ApplyDeployment {
        namespace: String,
        name: String,
        source: kube::Error,
    },

    #[error("applying PodDisruptionBudget {namespace}/{name} failed: {source}")]
    ApplyPodDisruptionBudget {
        namespace: String,
        name: String,
        source: kube::Error,
    },

    #[error("reading Deployment {namespace}/{name} failed: {source}")]
    GetDeployment {
        namespace: String,
        name: String,
        source: kube::Error,
    },

    #[error("writing the status of EventConsumer {namespace}/{name} failed: {source}")]
    PatchStatus {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

impl Error {
    /// CamelCase, static: used as event reason, `Degraded` reason and metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::InvalidObject(_) => "InvalidObject",
            Error::InvalidSpec(e) => e.reason(),
            Error::SecretNotFound { .. } => "SecretNotFound",
            Error::SecretKeyMissing { .. } => "SecretKeyMissing",
            Error::GetSecret { .. } => "GetSecretFailed",
            Error::DrainToken { .. } => "DrainTokenFailed",
            Error::ApplyConfigMap { .. } => "ApplyConfigMapFailed",
            Error::ApplyDeployment { .. } => "ApplyDeploymentFailed",
            Error::ApplyPodDisruptionBudget { .. } => "ApplyPodDisruptionBudgetFailed",
            Error::GetDeployment { .. } => "GetDeploymentFailed",
            Error::PatchStatus { .. } => "PatchStatusFailed",
        }
    }

    /// Permanent errors cannot be cured by retrying: they set `Degraded` and wait for a
    /// change to the EventConsumer or a Secret it references. Everything else is retried with
    /// backoff.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::InvalidObject(_)
            | Error::InvalidSpec(_)
            | Error::SecretNotFound { .. }
            | Error::SecretKeyMissing { .. } => true,
            // An apply the API server refuses as invalid (422) will be refused again until
            // the spec changes (e.g. a pod template field the server rejects).
            Error::ApplyDeployment { source, .. }
            | Error::ApplyConfigMap { source, .. }
            | Error::ApplyPodDisruptionBudget { source, .. } => is_invalid(source),
            _ => false,
        }
    }
}

fn is_invalid(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 422)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::Problem;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("boom", "Invalid").with_code(code),
        ))
    }

    #[test]
    fn reasons_are_static_camel_case_and_permanence_is_right() {
        let ns = || "shop".to_owned();
        let n = || "x".to_owned();
        let cases: Vec<(Error, &str, bool)> = vec![
            (Error::InvalidObject("bad".into()), "InvalidObject", true),
            (
                Error::InvalidSpec(InvalidSpec {
                    problems: vec![Problem {
                        reason: "PreStopConflict",
                        message: "m".into(),
                    }],
                }),
                "PreStopConflict",
                true,
            ),
            (
                Error::SecretNotFound {
                    namespace: ns(),
                    name: n(),
                    field: "f",
                },
                "SecretNotFound",
                true,
            ),
            (
                Error::SecretKeyMissing {
                    namespace: ns(),
                    name: n(),
                    key: "k".into(),
                    field: "f",
                },
                "SecretKeyMissing",
                true,
            ),
            (
                Error::GetSecret {
                    namespace: ns(),
                    name: n(),
                    source: api(500),
                },
                "GetSecretFailed",
                false,
            ),
            (
                Error::DrainToken {
                    namespace: ns(),
                    name: n(),
                    source: api(500),
                },
                "DrainTokenFailed",
                false,
            ),
            (
                Error::ApplyConfigMap {
                    namespace: ns(),
                    name: n(),
                    source: api(500),
                },
                "ApplyConfigMapFailed",
                false,
            ),
            (
                Error::ApplyDeployment {
                    namespace: ns(),
                    name: n(),
                    source: api(422),
                },
                "ApplyDeploymentFailed",
                true,
            ),
            (
                Error::ApplyDeployment {
                    namespace: ns(),
                    name: n(),
                    source: api(409),
                },
                "ApplyDeploymentFailed",
                false,
            ),
            (
                Error::ApplyPodDisruptionBudget {
                    namespace: ns(),
                    name: n(),
                    source: api(503),
                },
                "ApplyPodDisruptionBudgetFailed",
                false,
            ),
            (
                Error::GetDeployment {
                    namespace: ns(),
                    name: n(),
                    source: api(500),
                },
                "GetDeploymentFailed",
                false,
            ),
            (
                Error::PatchStatus {
                    namespace: ns(),
                    name: n(),
                    source: api(500),
                },
                "PatchStatusFailed",
                false,
            ),
        ];
        for (e, reason, permanent) in cases {
            assert_eq!(e.reason(), reason, "{e}");
            assert!(reason.chars().next().unwrap().is_ascii_uppercase() && !reason.contains(' '));
            assert_eq!(e.is_permanent(), permanent, "{e}");
        }
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = Error::SecretKeyMissing {
            namespace: "shop".into(),
            name: "user".into(),
            key: "password".into(),
            field: "spec.kafka.auth.sasl.secretRef.passwordKey",
        };
        assert_eq!(
            e.to_string(),
            "Secret shop/user has no key \"password\", referenced by spec.kafka.auth.sasl.secretRef.passwordKey; add the key to the Secret or point spec.kafka.auth.sasl.secretRef.passwordKey at the right key"
        );
    }
}
