module github.com/qcrypt/qcrypt

go 1.26.8

require (
	github.com/coreos/go-systemd/v22 v22.7.0
	github.com/godbus/dbus/v5 v5.2.4
	github.com/sirupsen/logrus v1.10.2
	gopkg.in/ini.v1 v1.68.0
)

require golang.org/x/sys v0.27.0
