//! Just enough DER to read the subject common name of an X.509 certificate.
//!
//! Walks `Certificate -> tbsCertificate -> subject` (RFC 5280 §4.1) and returns
//! the first `commonName` attribute. Everything is bounds-checked; malformed
//! input yields `None`, never a panic. It performs no verification: it is meant
//! for certificates rustls has already verified.

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const INTEGER: u8 = 0x02;
/// `[0] EXPLICIT Version` in `TBSCertificate`.
const VERSION: u8 = 0xa0;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;
const BMP_STRING: u8 = 0x1e;
/// Content octets of OID 2.5.4.3 (`id-at-commonName`).
const COMMON_NAME_OID: &[u8] = &[0x55, 0x04, 0x03];

/// Splits one TLV off the front of `input`: `(tag, contents, rest)`.
///
/// Only single-byte tags and definite lengths of up to four length octets are
/// supported, which covers everything on the path to the subject name.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high-tag-number form
    }
    let (&first, mut input) = input.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 || input.len() < octets {
            return None; // indefinite or absurd length
        }
        let (len_bytes, rest) = input.split_at(octets);
        input = rest;
        len_bytes.iter().try_fold(0usize, |acc, &b| {
            acc.checked_mul(256)?.checked_add(usize::from(b))
        })?
    };
    if input.len() < len {
        return None;
    }
    let (contents, rest) = input.split_at(len);
    Some((tag, contents, rest))
}

/// Like [`tlv`], but requires the tag to be `expected`.
fn expect(input: &[u8], expected: u8) -> Option<(&[u8], &[u8])> {
    match tlv(input)? {
        (tag, contents, rest) if tag == expected => Some((contents, rest)),
        _ => None,
    }
}

/// The first subject common name of the DER-encoded certificate `cert`.
pub(crate) fn common_name(cert: &[u8]) -> Option<String> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let mut fields = tbs;
    if let Some((VERSION, _, rest)) = tlv(fields) {
        fields = rest;
    }
    let (_serial, fields) = expect(fields, INTEGER)?;
    let (_signature_algorithm, fields) = expect(fields, SEQUENCE)?;
    let (_issuer, fields) = expect(fields, SEQUENCE)?;
    let (_validity, fields) = expect(fields, SEQUENCE)?;
    let (mut subject, _) = expect(fields, SEQUENCE)?;

    while !subject.is_empty() {
        let (mut rdn, rest) = expect(subject, SET)?;
        subject = rest;
        while !rdn.is_empty() {
            let (attribute, rest) = expect(rdn, SEQUENCE)?;
            rdn = rest;
            let (oid, value) = expect(attribute, OID)?;
            if oid == COMMON_NAME_OID {
                let (tag, contents, _) = tlv(value)?;
                return decode_string(tag, contents);
            }
        }
    }
    None
}

/// Decodes the directory string types that occur in practice.
fn decode_string(tag: u8, contents: &[u8]) -> Option<String> {
    match tag {
        UTF8_STRING => String::from_utf8(contents.to_vec()).ok(),
        PRINTABLE_STRING | IA5_STRING => contents
            .is_ascii()
            .then(|| String::from_utf8_lossy(contents).into_owned()),
        BMP_STRING => {
            if contents.len() % 2 != 0 {
                return None;
            }
            let units = contents
                .chunks_exact(2)
                .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_dn(dn: rcgen::DistinguishedName) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["x.example".to_owned()]).unwrap();
        params.distinguished_name = dn;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_common_name_among_other_attributes() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "DE");
        dn.push(rcgen::DnType::OrganizationName, "Shrinker");
        dn.push(rcgen::DnType::CommonName, "edge-ä.1");
        assert_eq!(common_name(&cert_with_dn(dn)).as_deref(), Some("edge-ä.1"));
    }

    #[test]
    fn string_encodings() {
        for value in [
            rcgen::DnValue::PrintableString("edge-1".try_into().unwrap()),
            rcgen::DnValue::Ia5String("edge-1".try_into().unwrap()),
            rcgen::DnValue::BmpString(rcgen::string::BmpString::try_from("edge-1").unwrap()),
            rcgen::DnValue::Utf8String("edge-1".to_owned()),
        ] {
            let mut dn = rcgen::DistinguishedName::new();
            dn.push(rcgen::DnType::CommonName, value.clone());
            assert_eq!(
                common_name(&cert_with_dn(dn)).as_deref(),
                Some("edge-1"),
                "{value:?}"
            );
        }
    }

    #[test]
    fn no_common_name() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "Shrinker");
        assert_eq!(common_name(&cert_with_dn(dn)), None);
        assert_eq!(
            common_name(&cert_with_dn(rcgen::DistinguishedName::new())),
            None
        );
    }

    #[test]
    fn malformed_input_never_panics() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "edge");
        let der = cert_with_dn(dn);
        assert_eq!(common_name(&der).as_deref(), Some("edge"));
        // The outer SEQUENCE length no longer fits any truncation.
        for len in 0..der.len() {
            assert_eq!(common_name(&der[..len]), None, "truncated to {len}");
        }
        // Corrupt every byte in turn.
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = common_name(&bad);
        }
        for garbage in [
            &[][..],
            &[0x30],
            &[0x30, 0x80, 0x00, 0x00],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x1f, 0x01, 0x00],
        ] {
            assert_eq!(common_name(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn long_form_lengths() {
        assert_eq!(
            tlv(&[0x04, 0x81, 0x01, 0xaa]),
            Some((0x04, &[0xaa][..], &[][..]))
        );
        assert_eq!(
            tlv(&[0x04, 0x82, 0x00, 0x01, 0xaa, 0xbb]),
            Some((0x04, &[0xaa][..], &[0xbb][..]))
        );
        assert_eq!(tlv(&[0x04, 0x02, 0xaa]), None);
    }
}
