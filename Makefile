# qcrypt: build, test and install. `make check` is what CI runs.
GO        ?= go
BIN       := bin
PREFIX    ?= /usr
DESTDIR   ?=
# golangci-lint runs staticcheck, errcheck, errorlint, revive, unparam (.golangci.yml).
# Pinned, and installed per version so that a bump takes effect.
GOLANGCI_VERSION := v2.15.0
GOLANGCI := $(CURDIR)/.tools/golangci-lint-$(GOLANGCI_VERSION)/golangci-lint
# An exec count, not a duration: a -fuzztime duration races the fuzz coordinator's
# deadline (go.dev/issue/75804, fixed in Go 1.27) and fails a clean run now and then.
FUZZTIME  ?= 100000x
# Debian packages the tests need: bubblewrap (the simulator's qube sandboxes), gcc (-race),
# dbus (a private dbus-daemon for the D-Bus tests), dbus-broker (the same tests under
# dom0's bus), systemd (busctl, systemd-analyze), and
# for the real-kernel tests: qemu and busybox (the guest), cpio and kmod (its initramfs),
# bc, and the real block tools (cryptsetup-bin, dmsetup, e2fsprogs, btrfs-progs).
E2E_PACKAGES := qemu-system-x86 busybox-static cpio kmod bc cryptsetup-bin dmsetup e2fsprogs btrfs-progs
# The real qubesd (../shared/real-qubesd, test equipment: the tests run qcrypt against it).
REAL_QUBESD_PACKAGES := python3-lxml python3-libvirt python3-jinja2 python3-docutils python3-yaml python3-pyinotify
# The real qrexec (../shared/real-qrexec): built by the tests into the cache directory
# (QCRYPT_CACHE, default ~/.cache/qcrypt) once and reused.
REAL_QREXEC_PACKAGES := pkg-config libc6-dev libpam0g-dev
# make rpm and its test: rpmbuild (Debian's rpm), rpm2cpio.
RPM_PACKAGES := rpm rpm2cpio
# make system-test (../shared/real-systemd's guest runs this machine's root file system):
# udev, so the guest runs systemd-udevd as dom0 does, and a real XFCE session on Xvfb for
# the notifications.
SYSTEM_PACKAGES := udev xvfb xfce4-session xfce4-notifyd dbus-x11 dbus-user-session libnotify-bin x11-utils \
	x11-xserver-utils xfwm4 xfce4-settings xfconf
DEB_PACKAGES := bubblewrap gcc make dbus dbus-broker systemd shellcheck $(RPM_PACKAGES) $(E2E_PACKAGES) $(REAL_QUBESD_PACKAGES) \
	$(REAL_QREXEC_PACKAGES) $(SYSTEM_PACKAGES)
DEMO_PACKAGES := bubblewrap dbus
COMMANDS  := qubes-sim qcryptd qcryptctl

BINDIR    ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
UNITDIR   ?= $(PREFIX)/lib/systemd/system
MANDIR    ?= $(PREFIX)/share/man
DBUSDIR   ?= $(PREFIX)/share/dbus-1
# The system bus reads policies from /usr/share/dbus-1/system.d (and /etc), not from
# under another prefix.
POLICYDIR ?= /usr/share/dbus-1/system.d

.PHONY: rpm system-test test-broker all build demo demo-deps e2e check fmt-check vet lint test fuzz bench soak deps install uninstall clean vectors

all: build

# The version both binaries print (--version) and qcryptd shows on the bus.
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo 0.1.0-dev)
LDFLAGS   := -X github.com/qcrypt/qcrypt/cmd/qcryptd/cli.Version=$(VERSION) -X github.com/qcrypt/qcrypt/ctl.Version=$(VERSION)

build:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ $(addprefix ./cmd/,$(COMMANDS))

# qcrypt's main job on the embedded simulator, step by step (README's first command).
demo: demo-deps build
	BIN=$(BIN) timeout 180 ./ctl/demo.sh

# The real-kernel end-to-end tests (e2e/): real loop, dm-crypt, mounts and dbus-daemon,
# on this kernel when we are root and it has dm-crypt, else in a qemu guest booted from
# Debian's kernel package (downloaded once into /tmp/qcrypt-e2e-cache).
e2e:
	@missing=""; for p in $(E2E_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "e2e: missing Debian packages:$$missing (make deps)"; exit 1; fi
	./e2e/run.sh

# make check runs these in order and prints the time each took.
CHECK_STEPS := deps fmt-check vet lint test test-broker fuzz demo e2e system-test
check:
	@times=""; for step in $(CHECK_STEPS); do \
	  start=$$(date +%s); \
	  $(MAKE) --no-print-directory $$step || { echo "check: $$step failed after $$(($$(date +%s) - start)) s"; exit 1; }; \
	  times="$$times$$(printf '  %-12s %5d s' $$step $$(($$(date +%s) - start)))\n"; \
	done; printf "check: passed; time per step:\n$$times"

# The installed stack (e2e/system): the RPM installed with rpm in a qemu guest whose
# PID 1 is the real systemd and whose bus is dbus-broker (../shared/real-systemd), every
# scenario through the shipped unit, policy, activation file and autostart entry.
# Without ../shared/real-systemd it is skipped with a line (a failure under
# QCRYPT_REQUIRE_REAL_SYSTEMD=1); SYSTEM_TEST_SCENARIOS="00 02" runs a subset.
system-test:
	QCRYPT_SYSTEM_TEST=1 $(GO) test -count=1 -v -timeout 40m ./e2e/system/

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

vet:
	$(GO) vet ./...

$(GOLANGCI):
	GOBIN=$(dir $(GOLANGCI)) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_VERSION)

lint: $(GOLANGCI)
	$(GOLANGCI) run ./...

# The simulator tests need bubblewrap; under make they fail instead of skipping. The
# daemon package takes about 5 minutes here: the timeout leaves room for a machine
# twice as loaded (go test's default of 10 minutes did not).
test:
	QCRYPT_REQUIRE_SANDBOX=1 CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 30m ./...

# The tests over a real bus once more under dbus-broker, dom0's bus (dbustest runs it
# as systemd would): the client and activation tests, the notification agent, and the
# daemon's scenarios through its binaries (daemon/bustest: security, faults, qcryptctl).
test-broker:
	QCRYPT_TEST_BUS=dbus-broker QCRYPT_REQUIRE_SANDBOX=1 CGO_ENABLED=1 $(GO) test -race -count=1 -timeout 30m ./dbusapi/... ./ctl/ ./daemon/bustest/

# A short run of every fuzz target (they also run as seed-corpus tests in `test`).
# Only the packages that have one are built (go test -list compiles each package's tests).
fuzz:
	@for pkg in $$(grep -rl --include='*_test.go' '^func Fuzz' . | xargs -n1 dirname | sort -u); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
	    out=$$($(GO) test $$pkg -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) 2>&1) || { echo "$$out"; exit 1; }; \
	  done; \
	done

# Re-record the real qubesd's transcripts the simulator is held against
# (qubessim/testdata/real-qubesd/VERSION.txt).
vectors:
	QCRYPT_REQUIRE_REAL_QUBESD=1 QCRYPT_RECORD_VECTORS=1 $(GO) test -count=1 -run '^TestRealQubesdVectors$$' ./qubessim/

bench:
	QCRYPT_REQUIRE_SANDBOX=1 $(GO) test -p 1 -run '^$$' -bench . -benchtime 2s ./...

# Open/write/close cycles with checksums after every reopen: SOAK_CYCLES on the simulator,
# SOAK_E2E_CYCLES on the real kernel (make check runs 8 of those).
SOAK_CYCLES ?= 100
SOAK_E2E_CYCLES ?= 25
soak: build
	QCRYPT_REQUIRE_SANDBOX=1 QCRYPT_SOAK_CYCLES=$(SOAK_CYCLES) $(GO) test -count=1 -v -timeout 60m -run '^TestSoak$$' ./daemon/bustest/
	E2E_REAL=0 E2E_CYCLES=$(SOAK_E2E_CYCLES) E2E_RUN='^(TestLuksInitOpenWriteReopen|TestCycles)$$' ./e2e/run.sh

# On Debian as root: install what the tests need. Elsewhere: say exactly what is missing.
# need-packages installs the Debian packages of $(1) that are missing (as root with
# apt-get) or names them and stops.
define need-packages
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "deps: all present ($(1))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "deps: installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "deps: missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi
endef

deps:
	$(call need-packages,$(DEB_PACKAGES))
	$(GO) mod download

# make demo needs only the sandbox and a bus.
demo-deps:
	$(call need-packages,$(DEMO_PACKAGES))

# Installs qcryptd, qcryptctl, the systemd unit, D-Bus policy and activation file, the
# notification agent's autostart entry, shell completions and man pages
# (systemctl enable --now qcryptd afterwards). DESTDIR and PREFIX as usual.
# Installed files that name a binary say where it is: /usr/bin in the sources, $(BINDIR)
# once installed (make install PREFIX=/usr/local runs /usr/local/bin/qcryptd).
SUBST := sed -e 's|/usr/bin/|$(BINDIR)/|g'
INSTALLED := $(BINDIR)/qcryptd $(BINDIR)/qcryptctl \
	$(SYSCONFDIR)/xdg/autostart/qcryptctl-notify-agent.desktop \
	$(PREFIX)/share/bash-completion/completions/qcryptctl $(PREFIX)/share/zsh/site-functions/_qcryptctl \
	$(UNITDIR)/qcryptd.service $(POLICYDIR)/org.qcrypt.Qcryptd1.conf $(DBUSDIR)/system-services/org.qcrypt.Qcryptd1.service \
	$(MANDIR)/man1/qcryptctl.1 $(MANDIR)/man5/qcrypt.ini.5 $(MANDIR)/man8/qcryptd.8

install: build
	install -D -m 0755 $(BIN)/qcryptd $(DESTDIR)$(BINDIR)/qcryptd
	install -D -m 0755 $(BIN)/qcryptctl $(DESTDIR)$(BINDIR)/qcryptctl
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/xdg/autostart $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(POLICYDIR) $(DESTDIR)$(DBUSDIR)/system-services \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions $(DESTDIR)$(PREFIX)/share/zsh/site-functions
	$(SUBST) systemd/qcryptctl-notify-agent.desktop > $(DESTDIR)$(SYSCONFDIR)/xdg/autostart/qcryptctl-notify-agent.desktop
	$(SUBST) systemd/qcryptd.service > $(DESTDIR)$(UNITDIR)/qcryptd.service
	install -m 0644 systemd/org.qcrypt.Qcryptd1.conf $(DESTDIR)$(POLICYDIR)/org.qcrypt.Qcryptd1.conf
	install -m 0644 systemd/org.qcrypt.Qcryptd1.service $(DESTDIR)$(DBUSDIR)/system-services/org.qcrypt.Qcryptd1.service
	$(BIN)/qcryptctl completion bash > $(DESTDIR)$(PREFIX)/share/bash-completion/completions/qcryptctl
	$(BIN)/qcryptctl completion zsh > $(DESTDIR)$(PREFIX)/share/zsh/site-functions/_qcryptctl
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/qcryptd/default
	install -d -m 0700 $(DESTDIR)$(SYSCONFDIR)/blib
	install -D -m 0644 docs/man/qcryptctl.1 $(DESTDIR)$(MANDIR)/man1/qcryptctl.1
	install -D -m 0644 docs/man/qcrypt.ini.5 $(DESTDIR)$(MANDIR)/man5/qcrypt.ini.5
	install -D -m 0644 docs/man/qcryptd.8 $(DESTDIR)$(MANDIR)/man8/qcryptd.8

# Removes what install installed; chain files under /etc/qcryptd stay.
uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))

# The dom0 package (systemd/qcrypt.spec), built with rpmbuild from the tracked files of
# this tree as they are now (uncommitted changes included) into RPMDIR. --nodeps: the
# Go toolchain need not come from an RPM (and Debian's rpmbuild has no RPM database).
RPMDIR    ?= $(CURDIR)/rpmbuild
RPM_VERSION := $(shell sed -n 's/^Version: *//p' systemd/qcrypt.spec)
# A release tag v$(RPM_VERSION) at HEAD is release 1; any other commit sorts before it.
RPM_RELEASE ?= $(shell git describe --tags --exact-match --match 'v$(RPM_VERSION)' >/dev/null 2>&1 && echo 1 || \
	echo 0.$$(git rev-list --count HEAD).git$$(git rev-parse --short HEAD))
rpm:
	@command -v rpmbuild >/dev/null || { echo "rpm: rpmbuild is missing (Debian: apt-get install rpm; Fedora: dnf install rpm-build)"; exit 1; }
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "rpm: needs a git tree (the tarball holds its tracked files)"; exit 1; }
	rm -rf $(RPMDIR) && mkdir -p $(RPMDIR)/SOURCES
	git ls-files -z | tar --null -T - --ignore-failed-read --transform 's|^|qcrypt-$(RPM_VERSION)/|' \
		-czf $(RPMDIR)/SOURCES/qcrypt-$(RPM_VERSION).tar.gz
	rpmbuild -bb --nodeps --define "_topdir $(RPMDIR)" --define "qcrypt_version $(VERSION)" \
		--define "qcrypt_release $(RPM_RELEASE)" systemd/qcrypt.spec
	@ls $(RPMDIR)/RPMS/*/qcrypt-*.rpm

clean:
	rm -rf $(BIN) $(RPMDIR)
