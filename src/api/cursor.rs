//! Listing cursors: the last key of a page, bound to the listing it came from and signed, so a
//! cursor that was edited, or reused for another collection or prefix, is refused instead of
//! silently listing the wrong range. Signed with the deployment's peer token, so a cursor from one
//! region works in every region.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const TAG_BYTES: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the cursor is not one this listing issued")]
pub struct CursorError;

fn tag(secret: &str, collection: &str, prefix: &str, key: &str) -> [u8; TAG_BYTES] {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    for part in [collection, prefix, key] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part.as_bytes());
    }
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; TAG_BYTES];
    out.copy_from_slice(&full[..TAG_BYTES]);
    out
}

pub fn encode(secret: &str, collection: &str, prefix: &str, last_key: &str) -> String {
    let tag = tag(secret, collection, prefix, last_key);
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(last_key),
        URL_SAFE_NO_PAD.encode(tag)
    )
}

/// The last key of the previous page.
pub fn decode(
    secret: &str,
    collection: &str,
    prefix: &str,
    cursor: &str,
) -> Result<String, CursorError> {
    let (key_part, tag_part) = cursor.split_once('.').ok_or(CursorError)?;
    let key = String::from_utf8(URL_SAFE_NO_PAD.decode(key_part).map_err(|_| CursorError)?)
        .map_err(|_| CursorError)?;
    let given = URL_SAFE_NO_PAD.decode(tag_part).map_err(|_| CursorError)?;
    let expected = tag(secret, collection, prefix, &key);
    let same = given.len() == TAG_BYTES
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(key)
    } else {
        Err(CursorError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_tampering() {
        let cursor = encode("secret", "users", "a", "alice");
        assert_eq!(decode("secret", "users", "a", &cursor).unwrap(), "alice");
        let forged = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode("zed"),
            cursor.split_once('.').unwrap().1
        );
        assert_eq!(decode("secret", "users", "a", &forged), Err(CursorError));
        assert_eq!(decode("secret", "users", "b", &cursor), Err(CursorError));
        assert_eq!(decode("secret", "other", "a", &cursor), Err(CursorError));
        assert_eq!(
            decode("other-secret", "users", "a", &cursor),
            Err(CursorError)
        );
        assert_eq!(decode("secret", "users", "a", "garbage"), Err(CursorError));
    }
}
