//! The agent's token check.

use tether_protocol::{Body, ErrorCode, HandshakeError, Hello, check_hello, hello_error};

fn hello(token: &str) -> Hello {
    Hello {
        token: token.into(),
        ..Default::default()
    }
}

#[test]
fn the_right_token_is_accepted() {
    assert_eq!(check_hello(&hello("s3cret"), "s3cret"), Ok(()));
}

#[test]
fn a_wrong_or_missing_token_is_refused_with_a_clear_error_frame() {
    for (token, expected) in [
        ("", HandshakeError::MissingToken),
        ("s3cre", HandshakeError::WrongToken),
        ("s3cret!", HandshakeError::WrongToken),
        ("S3CRET", HandshakeError::WrongToken),
    ] {
        let err = check_hello(&hello(token), "s3cret").unwrap_err();
        assert_eq!(err, expected);
        let frame = hello_error(&err);
        let Some(Body::Error(info)) = frame.body else {
            panic!("not an error frame")
        };
        assert_eq!(info.code(), ErrorCode::Unauthorized);
        assert!(info.message.contains("token"), "{}", info.message);
    }
}
