// Test worker that breaks the reuseport contract: it never accepts on its inherited fd 3.
'use strict';
setInterval(() => {}, 1000);
process.on('SIGTERM', () => process.exit(0));
