//! Parsing and printing sizes and CPU amounts the way operators write them.

/// "512M", "1G", "1.5GiB", "1048576" → bytes (K/M/G/T are powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 2G"))?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
    };
    Ok((n * mult as f64) as u64)
}

/// "500m" → 500, "2" → 2000, "1.5" → 1500 millicores.
pub fn parse_cpu(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if let Some(m) = t.strip_suffix('m') {
        return m
            .parse()
            .map_err(|_| format!("{s:?} is not a CPU amount like 500m or 2"));
    }
    let cores: f64 = t
        .parse()
        .map_err(|_| format!("{s:?} is not a CPU amount like 500m or 2"))?;
    Ok((cores * 1000.0).round() as u32)
}

pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else if v >= 10.0 {
        format!("{v:.0}{}", U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

pub fn human_cpu(m: u32) -> String {
    if m == 0 {
        "-".into()
    } else if m.is_multiple_of(1000) {
        format!("{}", m / 1000)
    } else {
        format!("{m}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_operators_type() {
        assert_eq!(parse_bytes("512M").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12X").is_err());
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_cpu("500m").unwrap(), 500);
        assert_eq!(parse_cpu("2").unwrap(), 2000);
        assert_eq!(parse_cpu("0.25").unwrap(), 250);
        assert!(parse_cpu("fast").is_err());
        assert_eq!(human_bytes(64 << 20), "64M");
        assert_eq!(human_cpu(1500), "1500m");
    }
}
