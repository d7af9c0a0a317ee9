package chains

import "time"

// timeNow is replaced in tests that need fixed times.
var timeNow = func() time.Time { return time.Now().UTC() }
