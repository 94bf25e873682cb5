//! Worker frames are read from another process (a vendor's PKCS#11 library runs there, and may
//! misbehave): their decoding must refuse anything malformed with an error, never panic, never
//! allocate more than MAX_FRAME, and never accept trailing bytes.

use hsm::proto::{
    decode_body, encode_tagged, read_frame, read_tagged, Hello, Reply, Request, Response, MAX_FRAME,
};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = read_tagged::<Response>(&mut &bytes[..]);
        let _ = read_tagged::<Request>(&mut &bytes[..]);
        let _ = read_frame::<Hello>(&mut &bytes[..]);
        let _ = decode_body::<Response>(&bytes);
        let _ = decode_body::<Request>(&bytes);
    }

    #[test]
    fn a_valid_reply_with_bytes_appended_is_refused(id in any::<u64>(), extra in prop::collection::vec(any::<u8>(), 1..16), random in prop::collection::vec(any::<u8>(), 0..64)) {
        let frame = encode_tagged(id, &Response::Ok(Reply::Random(random))).unwrap();
        let (got, _) = read_tagged::<Response>(&mut &frame[..]).unwrap();
        prop_assert_eq!(got, id);
        // Appended inside the frame (the length grown to cover them): trailing body bytes.
        let mut grown = frame.to_vec();
        grown.extend_from_slice(&extra);
        let len = (grown.len() - 4) as u32;
        grown[..4].copy_from_slice(&len.to_le_bytes());
        prop_assert!(read_tagged::<Response>(&mut &grown[..]).is_err());
    }

    #[test]
    fn a_valid_frame_cut_anywhere_is_refused(cut in 0usize..40, random in prop::collection::vec(any::<u8>(), 1..32)) {
        let frame = encode_tagged(9, &Response::Ok(Reply::Random(random))).unwrap();
        let cut = cut.min(frame.len() - 1);
        prop_assert!(read_tagged::<Response>(&mut &frame[..cut]).is_err());
    }
}

#[test]
fn a_length_above_the_limit_is_refused_before_allocating() {
    let mut frame = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&[0; 16]);
    assert!(read_tagged::<Response>(&mut &frame[..]).is_err());
    let huge = u32::MAX.to_le_bytes();
    assert!(read_frame::<Hello>(&mut &huge[..]).is_err());
}
