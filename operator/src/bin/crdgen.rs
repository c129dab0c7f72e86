//! `crdgen [DIR]`: writes the CustomResourceDefinitions generated from the
//! Rust types to DIR (default `crds/`), one YAML file per resource.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "crds".into()));
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in stowage_operator::crd::all_yaml()? {
        std::fs::write(dir.join(file), yaml)?;
    }
    Ok(())
}
