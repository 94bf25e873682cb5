//! Names from AWS KMS: key ids, key ARNs, alias names, and the references a request may use.

use std::fmt;

use crate::error::KmsError;

/// A KMS key's id: 16 bytes, written as a lowercase UUID. Also the token object's `CKA_ID`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    pub fn new_random() -> KeyId {
        KeyId(*uuid::Uuid::new_v4().as_bytes())
    }

    pub fn parse(s: &str) -> Option<KeyId> {
        // Only the hyphenated form, as AWS prints it.
        if s.len() != 36 {
            return None;
        }
        uuid::Uuid::try_parse(s).ok().map(|u| KeyId(*u.as_bytes()))
    }

    pub fn bytes(&self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hsm::format_key_id(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Region and account that this service's ARNs carry.
#[derive(Debug, Clone)]
pub struct ArnScope {
    pub partition: String,
    pub region: String,
    pub account: String,
}

impl ArnScope {
    pub fn key_arn(&self, id: &KeyId) -> String {
        // On every response's hot path: pushes, not the formatting machinery.
        let mut arn = String::with_capacity(40 + self.region.len() + self.account.len());
        for part in [
            "arn:",
            &self.partition,
            ":kms:",
            &self.region,
            ":",
            &self.account,
            ":key/",
        ] {
            arn.push_str(part);
        }
        arn.push_str(&hsm::format_key_id(&id.0));
        arn
    }

    pub fn alias_arn(&self, alias: &str) -> String {
        format!(
            "arn:{}:kms:{}:{}:{}",
            self.partition, self.region, self.account, alias
        )
    }

    /// Parses a `KeyId` parameter: a key id, key ARN, alias name or alias ARN.
    /// An ARN of another partition, region or account names nothing here: `NotFoundException`.
    pub fn parse_reference(&self, s: &str) -> Result<KeyReference, KmsError> {
        if s.is_empty() || s.len() > 2048 {
            return Err(KmsError::Validation(
                "KeyId must be 1 to 2048 characters long".into(),
            ));
        }
        let not_found = || KmsError::NotFound(format!("Invalid keyId '{s}'"));
        if let Some(rest) = s.strip_prefix("arn:") {
            let parts: Vec<&str> = rest.splitn(5, ':').collect();
            let [partition, service, region, account, resource] = parts[..] else {
                return Err(not_found());
            };
            if service != "kms" {
                return Err(not_found());
            }
            if partition != self.partition || region != self.region || account != self.account {
                return Err(KmsError::NotFound(format!(
                    "{s} is not in this service's partition, region ({}) and account ({})",
                    self.region, self.account
                )));
            }
            if let Some(id) = resource.strip_prefix("key/") {
                return KeyId::parse(id)
                    .map(KeyReference::Key)
                    .ok_or_else(not_found);
            }
            if resource.starts_with("alias/") {
                validate_alias_name(resource).map_err(|_| not_found())?;
                return Ok(KeyReference::Alias(resource.to_string()));
            }
            return Err(not_found());
        }
        if s.starts_with("alias/") {
            validate_alias_name(s).map_err(|_| not_found())?;
            return Ok(KeyReference::Alias(s.to_string()));
        }
        KeyId::parse(s).map(KeyReference::Key).ok_or_else(not_found)
    }
}

/// What a request's `KeyId` names, before alias resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyReference {
    Key(KeyId),
    Alias(String),
}

/// AWS's rules for alias names: `alias/` and then letters, digits, `/_-`, 256 characters at most.
pub fn validate_alias_name(name: &str) -> Result<(), KmsError> {
    let Some(rest) = name.strip_prefix("alias/") else {
        return Err(KmsError::Validation(format!(
            "Alias must start with the prefix \"alias/\": {name}"
        )));
    };
    if name.len() > 256 || rest.is_empty() {
        return Err(KmsError::Validation(
            "Alias name must be 7 to 256 characters long".into(),
        ));
    }
    if !rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
    {
        return Err(KmsError::Validation(format!(
            "Alias name {name} contains characters other than letters, digits, '/', '_' and '-'"
        )));
    }
    Ok(())
}

/// A new id in AWS's shape: `cks-` and 17 hex digits, `cluster-` and 11 base32 characters.
pub fn new_custom_key_store_id() -> String {
    let u = uuid::Uuid::new_v4();
    format!("cks-{}", &hex::encode(u.as_bytes())[..17])
}

pub fn new_cluster_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let u = uuid::Uuid::new_v4();
    let s: String = u.as_bytes()[..11]
        .iter()
        .map(|b| ALPHABET[(*b % 32) as usize] as char)
        .collect();
    format!("cluster-{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> ArnScope {
        ArnScope {
            partition: "aws".into(),
            region: "us-east-1".into(),
            account: "111122223333".into(),
        }
    }

    #[test]
    fn every_reference_form_parses() {
        let id = KeyId::new_random();
        let s = scope();
        assert_eq!(
            s.parse_reference(&id.to_string()).unwrap(),
            KeyReference::Key(id)
        );
        assert_eq!(
            s.parse_reference(&s.key_arn(&id)).unwrap(),
            KeyReference::Key(id)
        );
        assert_eq!(
            s.parse_reference("alias/app").unwrap(),
            KeyReference::Alias("alias/app".into())
        );
        assert_eq!(
            s.parse_reference(&s.alias_arn("alias/app")).unwrap(),
            KeyReference::Alias("alias/app".into())
        );
    }

    #[test]
    fn arn_of_another_region_or_account_is_not_found() {
        let id = KeyId::new_random();
        let s = scope();
        let other_region = format!("arn:aws:kms:eu-west-1:111122223333:key/{id}");
        let other_account = format!("arn:aws:kms:us-east-1:999999999999:key/{id}");
        for arn in [other_region, other_account] {
            assert!(
                matches!(s.parse_reference(&arn), Err(KmsError::NotFound(_))),
                "{arn}"
            );
        }
    }

    #[test]
    fn malformed_references_are_not_found() {
        for bad in [
            "nope",
            "1234",
            "alias/",
            "alias/bad name",
            "arn:aws:kms:us-east-1:111122223333:key/zz",
        ] {
            assert!(
                matches!(scope().parse_reference(bad), Err(KmsError::NotFound(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            scope().parse_reference(""),
            Err(KmsError::Validation(_))
        ));
    }

    #[test]
    fn ids_have_aws_shapes() {
        let cks = new_custom_key_store_id();
        assert!(cks.starts_with("cks-") && cks.len() == 21, "{cks}");
        let cluster = new_cluster_id();
        assert!(
            cluster.starts_with("cluster-") && cluster.len() == 19,
            "{cluster}"
        );
    }
}
