"""`lorakit <command>`: command name -> (options dataclass, function). The top floor: nothing imports it."""
