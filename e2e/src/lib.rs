//! The local world harness (issue [2]).
