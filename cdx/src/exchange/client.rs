//! Exchange client (see below).
