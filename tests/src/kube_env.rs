//! Kubernetes fixtures: a client for the test bed's API server and per-test namespaces.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace as NamespaceObject;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::{START_HINT, state_dir, unique_name};

/// The kubeconfig of the test bed (`$KUBECONFIG` when set, else the test bed's admin one).
pub fn kubeconfig_path() -> std::path::PathBuf {
    crate::env_value("KUBECONFIG")
        .map(Into::into)
        .unwrap_or_else(|| state_dir().join("kubeconfig"))
}

/// A client for the test bed's API server, or a panic that says how to start it.
pub async fn client() -> Client {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the test bed's kubeconfig {}: {e}; {START_HINT}",
            path.display()
        )
    });
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("invalid kubeconfig {}: {e}", path.display()));
    let client = Client::try_from(config).unwrap_or_else(|e| panic!("kube client: {e}"));
    if let Err(e) = client.apiserver_version().await {
        panic!("the test bed's API server is not reachable ({e}); {START_HINT}");
    }
    client
}

/// A namespace that belongs to one test; deleted when dropped.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// Creates a uniquely named namespace.
    pub async fn create(client: &Client, prefix: &str) -> Namespace {
        Self::create_with_labels(client, prefix, BTreeMap::new()).await
    }

    /// Creates a uniquely named namespace with `labels` (e.g. Pod Security enforcement).
    pub async fn create_with_labels(
        client: &Client,
        prefix: &str,
        labels: BTreeMap<String, String>,
    ) -> Namespace {
        let name = unique_name(prefix);
        let ns = NamespaceObject {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<NamespaceObject>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        Namespace { name }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // A fresh client on a private runtime in its own thread: the test's runtime may be
        // a single-threaded one that this drop is blocking, so its connections cannot be
        // used here. Deletion itself is asynchronous (the namespace controller finishes it).
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(kubeconfig) = Kubeconfig::read_from(kubeconfig_path()) else {
                    return;
                };
                let Ok(config) =
                    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await
                else {
                    return;
                };
                let Ok(client) = Client::try_from(config) else {
                    return;
                };
                let _ = Api::<NamespaceObject>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await;
            });
        })
        .join();
    }
}

/// Waits until the CustomResourceDefinition `name` is Established (polled through the API:
/// `kubectl wait --for=condition=Established` fails at once on a CRD whose status has no
/// conditions yet, which is the case for a moment after it is first created).
pub async fn wait_crd_established(client: &Client, name: &str) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let established = crds.get(name).await.ok().is_some_and(|crd| {
            crd.status.and_then(|s| s.conditions).is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
        });
        if established {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the CRD {name} was not established within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
