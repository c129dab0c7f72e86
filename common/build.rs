//! The schema migrations are embedded at compile time (refinery's
//! `embed_migrations!`), which does not tell cargo about the directory: a new
//! migration file would not rebuild the crate without this.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
