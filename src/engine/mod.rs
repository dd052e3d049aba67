//! The inference engine: windows × prompts → answers (see issue "The inference engine").
//!
//! So far: answer-kind parsing and alert edge state ([`answer`]), the fair, bounded job queue
//! ([`queue`]).

pub mod answer;
pub mod queue;
