//! `locus resolver new <name>`: a standalone resolver crate to start from.
//!
//! Why standalone, with the guest crate copied in: a resolver is the user's code, kept in the
//! user's repository, far from a locus checkout (and locus may be a binary in an image with no
//! source at all). So the crate carries its own `[workspace]` table (cargo would otherwise adopt it
//! into any workspace around it) and a copy of `locus-resolver` embedded in this binary, and
//! builds with nothing but cargo and the `wasm32-unknown-unknown` target.

use std::path::{Path, PathBuf};

/// The guest crate, as this binary was built with it.
const GUEST_MANIFEST: &str = include_str!("../resolvers/locus-resolver/Cargo.toml");
const GUEST_LIB: &str = include_str!("../resolvers/locus-resolver/src/lib.rs");
/// The guest crate compiles the guide's snippets as doc-tests; a copy has no guide beside it.
const GUEST_README_HOOK: &str = "// The guide's snippets (resolvers/README.md in the locus repository) are compiled as doc-tests.
#[cfg(doctest)]
#[doc = include_str!(\"../../README.md\")]
pub struct ReadmeSnippets;
";

const TEMPLATE_MANIFEST: &str = include_str!("../resolvers/template/Cargo.toml.in");
const TEMPLATE_LIB: &str = include_str!("../resolvers/template/lib.rs");
const TEMPLATE_README: &str = include_str!("../resolvers/template/README.md");

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("{0:?} cannot name a resolver crate: use ASCII letters, digits, '-' and '_', starting with a letter, at most 64 bytes")]
    BadName(String),
    #[error("{0} exists already; choose another name or --path")]
    Exists(PathBuf),
    #[error("writing {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A name that is both a resolver name (uploads take `[A-Za-z0-9._-]`) and a cargo package name.
fn validate(name: &str) -> Result<(), ScaffoldError> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(())
        .ok_or_else(|| ScaffoldError::BadName(name.to_owned()))
}

/// The files of a new resolver crate, relative to its folder.
pub fn files(name: &str) -> Result<Vec<(&'static str, String)>, ScaffoldError> {
    validate(name)?;
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &name.replace('-', "_"))
    };
    Ok(vec![
        ("Cargo.toml", fill(TEMPLATE_MANIFEST)),
        ("src/lib.rs", fill(TEMPLATE_LIB)),
        ("README.md", fill(TEMPLATE_README)),
        (".gitignore", "/target\n".to_owned()),
        (
            "vendor/locus-resolver/Cargo.toml",
            GUEST_MANIFEST.to_owned(),
        ),
        (
            "vendor/locus-resolver/src/lib.rs",
            GUEST_LIB.replace(GUEST_README_HOOK, ""),
        ),
    ])
}

/// Write a new resolver crate named `name` into `parent/name`; returns its folder.
pub fn create(name: &str, parent: &Path) -> Result<PathBuf, ScaffoldError> {
    let files = files(name)?;
    let root = parent.join(name);
    if root.exists() {
        return Err(ScaffoldError::Exists(root));
    }
    for (relative, contents) in files {
        let path = root.join(relative);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, contents));
        written.map_err(|cause| ScaffoldError::Write { path, cause })?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_suit_both_cargo_and_uploads() {
        for good in ["cart", "my-resolver", "r2_d2"] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "2fast",
            "has space",
            "dots.are.uploadable.but.not.crates",
            "ü",
        ] {
            assert!(
                matches!(validate(bad), Err(ScaffoldError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_copy_of_the_guest_crate_drops_only_the_guide_hook() {
        assert!(
            GUEST_LIB.contains(GUEST_README_HOOK),
            "the hook moved: update GUEST_README_HOOK"
        );
        let files = files("my-resolver").unwrap();
        let lib = &files
            .iter()
            .find(|(path, _)| *path == "vendor/locus-resolver/src/lib.rs")
            .unwrap()
            .1;
        assert!(!lib.contains("include_str!"));
        assert_eq!(lib.len(), GUEST_LIB.len() - GUEST_README_HOOK.len());
        let manifest = &files[0].1;
        assert!(manifest.contains("name = \"my-resolver\"") && manifest.contains("[workspace]"));
        assert!(files[2].1.contains("my_resolver.wasm"));
        assert!(!files.iter().any(|(_, text)| text.contains("{{")));
    }

    #[test]
    fn an_existing_folder_is_never_overwritten() {
        let parent = std::env::temp_dir().join(format!("locus-scaffold-{}", std::process::id()));
        std::fs::create_dir_all(parent.join("taken")).unwrap();
        assert!(matches!(
            create("taken", &parent),
            Err(ScaffoldError::Exists(_))
        ));
        let root = create("fresh", &parent).unwrap();
        assert!(root.join("vendor/locus-resolver/src/lib.rs").is_file());
        std::fs::remove_dir_all(parent).unwrap();
    }
}
