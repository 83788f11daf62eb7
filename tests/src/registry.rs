//! The images an installation pulls: what `make images` wrote as OCI archives, pushed once
//! per test binary run with `tests/env/push.sh` (what `make push` runs) to the registry the
//! cluster pulls from, and referenced by digest so a pod runs exactly what this run pushed
//! (even if another run pushes the same tag meanwhile, and with `IfNotPresent`, which would
//! keep a stale copy of a moved tag).
//!
//! The registry is `SLUICE_E2E_REGISTRY` (`host[:port][/path]`); the test bed's env file
//! sets it to a path on its own registry (tests/env/registry.sh). The image tag is
//! `SLUICE_IMAGE_TAG` (default `dev`, as `make images`).

use std::process::Command;
use std::sync::OnceLock;

use crate::{START_HINT, env_scripts, env_value};

/// One pushed image: `repository:tag@digest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// `host[:port][/path]/NAME`.
    pub repository: String,
    /// The tag it was pushed as.
    pub tag: String,
    /// `sha256:...`, as the registry computed it.
    pub digest: String,
}

impl Image {
    /// Parses a line `push.sh` prints: `REGISTRY/NAME:TAG@sha256:...`.
    pub fn parse(line: &str) -> Option<Image> {
        let (named, digest) = line.trim().split_once('@')?;
        let (repository, tag) = named.rsplit_once(':')?;
        let valid = !repository.is_empty()
            && !repository.ends_with('/')
            && !tag.is_empty()
            && !tag.contains('/')
            && digest
                .strip_prefix("sha256:")
                .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        valid.then(|| Image {
            repository: repository.to_owned(),
            tag: tag.to_owned(),
            digest: digest.to_owned(),
        })
    }

    /// The last path segment of the repository (`operator`, `consumer`, ...).
    pub fn name(&self) -> &str {
        self.repository.rsplit('/').next().unwrap_or_default()
    }

    /// What goes after the repository and `:` in a chart's `image.tag` value: `TAG@DIGEST`
    /// (the chart writes `repository:tag`; the digest decides what is pulled).
    pub fn tag_and_digest(&self) -> String {
        format!("{}@{}", self.tag, self.digest)
    }

    /// The full reference for a Pod's `image`: `REPOSITORY:TAG@DIGEST`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.tag_and_digest())
    }
}

/// The operator, sidecar and test application images, as pushed.
#[derive(Clone, Debug)]
pub struct Images {
    pub registry: String,
    pub operator: Image,
    pub consumer: Image,
    pub testapp: Image,
}

/// The registry the end-to-end tests push to and the cluster pulls from:
/// `SLUICE_E2E_REGISTRY`, else a path on the test bed's registry (`SLUICE_REGISTRY`).
pub fn e2e_registry() -> String {
    if let Some(r) = env_value("SLUICE_E2E_REGISTRY").filter(|r| !r.trim().is_empty()) {
        return r.trim().trim_end_matches('/').to_owned();
    }
    match env_value("SLUICE_REGISTRY") {
        Some(r) => format!("{}/e2e", r.trim().trim_end_matches('/')),
        None => panic!(
            "neither SLUICE_E2E_REGISTRY (host[:port][/path] of a registry the cluster pulls \
             from) nor the test bed's SLUICE_REGISTRY is set; {START_HINT}"
        ),
    }
}

/// Pushes the images once per process (later calls return the first push's result) and
/// returns their references. Panics with what `push.sh` said when it fails.
pub fn pushed() -> &'static Images {
    static PUSHED: OnceLock<Images> = OnceLock::new();
    PUSHED.get_or_init(push)
}

fn push() -> Images {
    let registry = e2e_registry();
    let tag = env_value("SLUICE_IMAGE_TAG").unwrap_or_else(|| "dev".into());
    let started = std::time::Instant::now();
    let out = Command::new("bash")
        .arg(env_scripts().join("push.sh"))
        .args([
            registry.as_str(),
            tag.as_str(),
            "operator",
            "consumer",
            "testapp",
        ])
        .output()
        .unwrap_or_else(|e| panic!("running tests/env/push.sh: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tests/env/push.sh {registry} {tag} failed (the images come from `make images`; the \
         registry must accept pushes from this host):\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images: Vec<Image> = stdout.lines().filter_map(Image::parse).collect();
    let find = |name: &str| {
        images
            .iter()
            .find(|i| i.name() == name)
            .cloned()
            .unwrap_or_else(|| panic!("push.sh printed no reference for {name}:\n{stdout}"))
    };
    let images = Images {
        operator: find("operator"),
        consumer: find("consumer"),
        testapp: find("testapp"),
        registry,
    };
    println!(
        "pushed operator, consumer and testapp to {} in {:.1?}",
        images.registry,
        started.elapsed()
    );
    images
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_push_output_with_a_port_and_a_path() {
        let i = Image::parse(&format!("127.0.0.1:5005/e2e/operator:dev@{D}\n")).expect("parsed");
        assert_eq!(i.repository, "127.0.0.1:5005/e2e/operator");
        assert_eq!(i.tag, "dev");
        assert_eq!(i.digest, D);
        assert_eq!(i.name(), "operator");
        assert_eq!(
            i.reference(),
            format!("127.0.0.1:5005/e2e/operator:dev@{D}")
        );
        assert_eq!(i.tag_and_digest(), format!("dev@{D}"));
    }

    #[test]
    fn parses_a_registry_without_a_port() {
        let i = Image::parse(&format!("registry.example/team/sluice/consumer:1.0@{D}")).unwrap();
        assert_eq!(i.repository, "registry.example/team/sluice/consumer");
        assert_eq!(i.name(), "consumer");
    }

    #[test]
    fn rejects_lines_that_are_not_references() {
        for line in [
            "",
            "[push] pushed something",
            "127.0.0.1:5005/e2e/operator:dev",
            "127.0.0.1:5005/e2e/operator@sha256:abc",
            &format!("127.0.0.1:5005/e2e/operator:dev@sha256:{}", "0".repeat(63)),
            &format!("127.0.0.1:5005/e2e/operator:dev@sha256:{}", "g".repeat(64)),
            &format!("127.0.0.1:5005/e2e/operator:dev@md5:{}", "0".repeat(64)),
            &format!(":dev@{D}"),
        ] {
            assert_eq!(Image::parse(line), None, "{line:?}");
        }
    }
}
