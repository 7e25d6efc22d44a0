//! The public API of the sandbox: `hello.HelloService`, generated at build time from
//! `hello.proto`, and the encoded file descriptor set for server reflection.

#![allow(clippy::all)]

tonic::include_proto!("hello");

/// Encoded `FileDescriptorSet` of `hello.proto`, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hello_descriptor");
