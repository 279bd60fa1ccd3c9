//! Rules for collection names and record keys, and the key range of a prefix.
//!
//! Names are compared bytewise (the `C` collation in PostgreSQL, which for UTF-8 is code-point
//! order), so listings are in the same order in every region whatever its locale.

/// Longest collection name or key, in bytes.
pub const MAX_NAME_BYTES: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{0} is longer than {MAX_NAME_BYTES} bytes")]
    TooLong(&'static str),
    #[error("{0} must not contain control characters")]
    ControlCharacter(&'static str),
    #[error("collection names starting with '_' are reserved")]
    Reserved,
}

/// Check a record key (`what` = "key") or a collection name (`what` = "collection").
pub fn validate(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty(what));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(what));
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacter(what));
    }
    Ok(())
}

/// A collection a user may write to: valid, and not a system collection.
pub fn validate_user_collection(name: &str) -> Result<(), NameError> {
    validate("collection", name)?;
    if name.starts_with(super::policy::SYSTEM_PREFIX) {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// The exclusive upper bound of the keys that start with `prefix`, in code-point order: the
/// prefix with its last character incremented. `None` when no bound exists (empty prefix, or a
/// prefix of only U+10FFFF).
pub fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = u32::from(last) + 1;
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(validate("key", ""), Err(NameError::Empty("key")));
        assert_eq!(
            validate("key", &"x".repeat(513)),
            Err(NameError::TooLong("key"))
        );
        assert!(validate("key", &"x".repeat(512)).is_ok());
        assert_eq!(
            validate("key", "a\nb"),
            Err(NameError::ControlCharacter("key"))
        );
        assert_eq!(
            validate_user_collection("_collections"),
            Err(NameError::Reserved)
        );
        assert!(validate("key", "ünïcode/with spaces").is_ok());
    }

    #[test]
    fn upper_bounds() {
        assert_eq!(prefix_upper_bound("ab").as_deref(), Some("ac"));
        assert_eq!(prefix_upper_bound(""), None);
        assert_eq!(prefix_upper_bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_upper_bound("\u{D7FF}").as_deref(), Some("\u{E000}"));
    }

    proptest! {
        /// In code-point (= UTF-8 byte) order, a key lies in [prefix, bound) exactly when it
        /// starts with the prefix.
        #[test]
        fn the_bound_selects_exactly_the_prefixed_keys(prefix in "\\PC{0,4}", key in "\\PC{0,6}") {
            let in_range = key.as_str() >= prefix.as_str()
                && prefix_upper_bound(&prefix).is_none_or(|upper| key.as_str() < upper.as_str());
            prop_assert_eq!(in_range, key.starts_with(&prefix));
        }

        #[test]
        fn prefixed_keys_are_in_range(prefix in "\\PC{0,4}", suffix in "\\PC{0,4}") {
            let key = format!("{prefix}{suffix}");
            prop_assert!(prefix_upper_bound(&prefix).is_none_or(|upper| key < upper));
        }
    }
}
