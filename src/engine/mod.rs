//! The inference engine: windows × prompts → answers (see issue "The inference engine").
//!
//! So far: answer-kind parsing and alert edge state ([`answer`]).

pub mod answer;
