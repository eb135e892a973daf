//! Naming rules shared by every side of the contract.

/// A DNS label (RFC 1123): 1 to 63 of `a-z`, `0-9` and `-`, not starting or
/// ending with `-`. VPS, template and node names follow it.
pub fn check_dns_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("{name:?} must be 1 to 63 characters"));
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok || name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "{name:?} is not a DNS label (lowercase letters, digits and '-', not at either end)"
        ));
    }
    Ok(())
}
