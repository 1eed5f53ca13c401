"""A Riva-compatible streaming ASR server (`nvidia.riva.asr.RivaSpeechRecognition`) on the shared engine."""
