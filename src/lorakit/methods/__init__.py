"""Parameter-efficient methods behind one interface (`lorakit.methods.base.Method`), their registry and
combination. Imports only `lorakit.core`."""
