//! The protobuf codec of every Kanade service and client: prost's, with small initial buffers.
//!
//! tonic's default codec reserves 8 KiB to encode and 8 KiB to decode per stream, up front. An
//! ingest replica holds thousands of idle agent streams whose messages are a few dozen bytes
//! (Hello, Ack); 1 KiB buffers grow on demand for the rare large event and save ~14 KiB per idle
//! stream (measured with `kanade-bench connections`).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial buffer size per direction and stream.
const BUFFER_BYTES: usize = 1024;
/// tonic's default: encode this much before yielding to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// prost encoding with small initial buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
