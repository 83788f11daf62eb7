//! The committed CRD files must be exactly what the types generate.

use std::path::PathBuf;

use sluice_operator::generate::{CRD_FILE, CRD_PATHS, crd_yaml};

/// The repository in the checkout the test runs from (cargo sets the variable for the test
/// process); CI may reuse a binary built in an earlier clone of the same sources.
fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

#[test]
fn committed_crds_match_the_types() {
    let expected = crd_yaml();
    for dir in CRD_PATHS {
        let path = repo_root().join(dir).join(CRD_FILE);
        let actual = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read {}: {e}; run `make generate` to write it",
                path.display()
            )
        });
        assert!(
            actual == expected,
            "{} differs from what operator/src/crd.rs generates; run `make generate` \
             (operator/generate.sh) and commit the result",
            path.display()
        );
    }
}
