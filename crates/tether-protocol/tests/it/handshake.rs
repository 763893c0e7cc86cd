//! The agent's token check.

use tether_protocol::{
    Body, ErrorCode, HandshakeError, Hello, TokenDigest, check_hello, hello_error,
};

fn hello(token: &str) -> Hello {
    Hello {
        token: token.into(),
        ..Default::default()
    }
}

#[test]
fn the_right_token_is_accepted() {
    let digest = TokenDigest::of("s3cret");
    assert_eq!(check_hello(&hello("s3cret"), &digest), Ok(()));
    // What an agent pod is given: the digest in hex, never the token.
    let parsed = TokenDigest::from_hex(&digest.to_hex()).unwrap();
    assert_eq!(check_hello(&hello("s3cret"), &parsed), Ok(()));
    assert_eq!(
        digest.to_hex(),
        // printf s3cret | sha256sum
        "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
    );
}

#[test]
fn a_wrong_or_missing_token_is_refused_with_a_clear_error_frame() {
    for (token, expected) in [
        ("", HandshakeError::MissingToken),
        ("s3cre", HandshakeError::WrongToken),
        ("s3cret!", HandshakeError::WrongToken),
        ("S3CRET", HandshakeError::WrongToken),
    ] {
        let err = check_hello(&hello(token), &TokenDigest::of("s3cret")).unwrap_err();
        assert_eq!(err, expected);
        let frame = hello_error(&err);
        let Some(Body::Error(info)) = frame.body else {
            panic!("not an error frame")
        };
        assert_eq!(info.code(), ErrorCode::Unauthorized);
        assert!(info.message.contains("token"), "{}", info.message);
    }
}

#[test]
fn a_digest_must_be_64_hex_digits() {
    for bad in [
        "",
        "abc",
        &"g".repeat(64),
        &"a".repeat(63),
        &"a".repeat(66),
        "é".repeat(32).as_str(),
    ] {
        assert!(TokenDigest::from_hex(bad).is_none(), "{bad:?}");
    }
}
