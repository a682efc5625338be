//! The demo model's data: procedural clips of coloured shapes and their captions
//! ([`clips`]), the training run that makes the demo model from them ([`train`]), and the reading
//! of a generated video ([`judge`]) by which a test checks that it shows what its prompt says.

pub mod clips;
pub mod judge;
pub mod train;
