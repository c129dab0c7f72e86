//! `crdgen [DIR...]`: writes the CustomResourceDefinitions generated from
//! the Rust types into each DIR, one YAML file per resource. By default into
//! `crds/` and the Helm chart's copy `charts/stowage/files/crds/` (tests fail
//! when either drifts from the types).

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut dirs: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if dirs.is_empty() {
        dirs = vec!["crds".into(), "charts/stowage/files/crds".into()];
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir)?;
        for (file, yaml) in stowage_operator::crd::all_yaml()? {
            std::fs::write(dir.join(file), yaml)?;
        }
    }
    Ok(())
}
